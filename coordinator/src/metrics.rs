//! Prometheus metrics of a coordinator, served at `/metrics` on the admin
//! listener. A placeholder until the metrics module lands: the route, its
//! content type and its admin check are in place.

use crate::runtime::Coordinator;

/// The coordinator's metrics in the Prometheus text format.
pub fn render(coord: &Coordinator) -> String {
    let _ = coord;
    "# metrics are not wired yet\n".to_string()
}
