//! A request that is not a valid protobuf message of its method (a string
//! field that is not UTF-8, a truncated or garbled body) is the caller's
//! mistake: `INVALID_ARGUMENT`, not the `INTERNAL` that tonic's prost codec
//! answers (it cannot tell a request it decodes from a reply). Such a
//! request never reaches a handler, so nothing changed; this layer only
//! corrects the code of that answer, keeping its message.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::{Layer, Service};

/// How tonic's prost codec starts the message of a decode failure, as it
/// travels in `grpc-message` (percent-encoded: spaces are `%20`).
const DECODE_FAILURE: &[u8] = b"failed%20to%20decode%20Protobuf%20message";

/// Answers undecodable requests with `INVALID_ARGUMENT`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MalformedRequestLayer;

impl<S> Layer<S> for MalformedRequestLayer {
    type Service = MalformedRequest<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MalformedRequest { inner }
    }
}

/// The service [`MalformedRequestLayer`] makes.
#[derive(Clone, Debug)]
pub struct MalformedRequest<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for MalformedRequest<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut res = fut.await?;
            correct(res.headers_mut());
            Ok(res)
        })
    }
}

/// Turns a trailers-only INTERNAL decode failure into INVALID_ARGUMENT.
fn correct(headers: &mut http::HeaderMap) {
    let internal = headers
        .get("grpc-status")
        .is_some_and(|s| s.as_bytes() == b"13");
    let decode = headers
        .get("grpc-message")
        .is_some_and(|m| m.as_bytes().starts_with(DECODE_FAILURE));
    if internal && decode {
        let code = (tonic::Code::InvalidArgument as i32).to_string();
        if let Ok(v) = http::HeaderValue::from_str(&code) {
            headers.insert("grpc-status", v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(status: &str, message: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", status.parse().expect("status"));
        h.insert("grpc-message", message.parse().expect("message"));
        h
    }

    #[test]
    fn only_decode_failures_change() {
        let mut h = headers(
            "13",
            "failed%20to%20decode%20Protobuf%20message:%20x:%20invalid%20string%20value",
        );
        correct(&mut h);
        assert_eq!(h["grpc-status"], "3");
        let mut h = headers("13", "something else");
        correct(&mut h);
        assert_eq!(h["grpc-status"], "13");
        let mut h = headers("10", "failed%20to%20decode%20Protobuf%20message");
        correct(&mut h);
        assert_eq!(h["grpc-status"], "10");
    }
}
