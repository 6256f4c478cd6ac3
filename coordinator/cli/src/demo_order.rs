//! `tandem demo --order`: a shop's orders across four services, in one
//! process, on loopback ports, with a coordinator on a sled log in a temp
//! dir. Each order reserves stock and charges a card **by saga** (the
//! inventory's and the payments' steps commit at once; a declined card
//! puts the stock back), and once the saga committed the order service
//! records the order and **notifies by transactional message** (the
//! notification goes out once the order's local transaction commits, and
//! never otherwise; one order in eight "dies" before its Submit and is
//! notified by the coordinator's back-check). At the end: stock and money
//! are where the orders say, nothing is left reserved, and every
//! confirmed order was notified exactly once, no other.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_coordinator::config::CoordinatorConfig;
use tandem_coordinator::log::SledLog;
use tandem_coordinator::server::RunningCoordinator;
use tandem_sdk::{
    Branch, BranchContext, Error, Gtid, HandlerError, Message, MessageCheck, Mode,
    ParticipantServer, Saga, TransactionClient, Vote,
};

/// How long an order's notification waits for its Submit before the
/// coordinator checks back.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(1);
const STOCK: i64 = 400;
const PRICE: i64 = 30;
const CARDS: usize = 8;
const CARD_LIMIT: i64 = 600;

/// A saga step that moves an amount now and puts it back when
/// compensated: the inventory (stock of one item) and the payments
/// service (each card's available credit) are both this.
#[derive(Default)]
struct Counters {
    name: &'static str,
    left: Mutex<HashMap<String, i64>>,
    /// What each step took, until the saga completes or is compensated.
    steps: Mutex<HashMap<(Gtid, u32), (String, i64)>>,
}

impl Counters {
    fn new(name: &'static str, keys: impl IntoIterator<Item = (String, i64)>) -> Counters {
        Counters {
            name,
            left: Mutex::new(keys.into_iter().collect()),
            steps: Mutex::default(),
        }
    }

    fn left(&self) -> HashMap<String, i64> {
        self.left.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn open_steps(&self) -> usize {
        self.steps.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Saga for Counters {
    async fn action(&self, ctx: &BranchContext, payload: &[u8]) -> Result<Vote, HandlerError> {
        let text = String::from_utf8_lossy(payload);
        let Some((key, amount)) = text.split_once(':') else {
            return Ok(Vote::no(format!("payload {text:?} is not <key>:<amount>")));
        };
        let amount: i64 = amount
            .parse()
            .map_err(|_| HandlerError::permanent("amount is not a number"))?;
        let mut steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        if steps.contains_key(&(ctx.gtid, ctx.branch_id)) {
            return Ok(Vote::yes()); // a forward retry of a step that went through
        }
        let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        let Some(have) = left.get_mut(key) else {
            return Ok(Vote::no(format!("{}: unknown {key}", self.name)));
        };
        if *have < amount {
            return Ok(Vote::no(format!(
                "{}: {key} has {have}, {amount} needed",
                self.name
            )));
        }
        *have -= amount;
        steps.insert((ctx.gtid, ctx.branch_id), (key.to_string(), amount));
        Ok(Vote::yes())
    }

    async fn compensate(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        let step = self
            .steps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(ctx.gtid, ctx.branch_id));
        if let Some((key, amount)) = step {
            *self
                .left
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key)
                .or_default() += amount;
        }
        Ok(())
    }

    async fn complete(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        self.steps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(ctx.gtid, ctx.branch_id));
        Ok(())
    }
}

/// The order service's own database: an order is confirmed in a local
/// transaction that also records its notification message; the
/// back-check reads that record (and closes an unknown one first, so its
/// "no" stays true).
#[derive(Default)]
struct Orders {
    /// Message gtid → whether its local transaction committed.
    messages: Mutex<HashMap<Gtid, bool>>,
}

impl Orders {
    fn confirm(&self, message: Gtid) -> Result<(), String> {
        let mut m = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        if m.contains_key(&message) {
            return Err("checked back as not committed".into());
        }
        m.insert(message, true);
        Ok(())
    }

    fn confirmed(&self) -> Vec<Gtid> {
        let m = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().filter(|(_, c)| **c).map(|(g, _)| *g).collect()
    }
}

impl MessageCheck for Orders {
    async fn check(&self, ctx: &BranchContext, _: &[u8]) -> Result<bool, HandlerError> {
        let mut m = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        Ok(*m.entry(ctx.gtid).or_insert(false))
    }
}

/// The notification service: what it sent, per message.
#[derive(Default)]
struct Notifier(Mutex<HashMap<Gtid, usize>>);

impl Message for Notifier {
    async fn deliver(&self, ctx: &BranchContext, _: &[u8]) -> Result<(), HandlerError> {
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ctx.gtid)
            .or_default() += 1;
        Ok(())
    }
}

/// What the order demo saw.
#[derive(Clone, Debug, Default)]
pub struct OrderReport {
    /// Orders placed.
    pub orders: usize,
    /// Orders whose saga committed and whose order was confirmed.
    pub confirmed: usize,
    /// Orders whose saga aborted (out of stock, card declined).
    pub declined: usize,
    /// Confirmed orders whose Submit was skipped (notified by the check).
    pub checked_back: usize,
    /// Calls that failed with an error (not a saga abort).
    pub errors: Vec<String>,
    /// Wall time.
    pub elapsed: Duration,
    /// Stock left, and what the confirmed orders took.
    pub stock_left: i64,
    /// Card credit taken, across all cards.
    pub charged: i64,
    /// Saga steps still recorded (neither completed nor compensated).
    pub open_steps: usize,
    /// Confirmed orders notified exactly once.
    pub notified_once: usize,
    /// Notifications that should not have gone out, or went out twice.
    pub wrong_notifications: usize,
}

impl OrderReport {
    /// Whether everything adds up.
    pub fn ok(&self) -> bool {
        let sold = self.confirmed as i64;
        self.errors.is_empty()
            && self.stock_left == STOCK - sold
            && self.charged == sold * PRICE
            && self.open_steps == 0
            && self.notified_once == self.confirmed
            && self.wrong_notifications == 0
    }
}

/// Runs `orders` orders, `concurrency` at a time.
///
/// # Errors
///
/// The temp dir, the log or a server could not be set up.
pub async fn run(orders: usize, concurrency: usize) -> anyhow::Result<OrderReport> {
    let dir = tempfile::Builder::new()
        .prefix("tandem-demo-order-")
        .tempdir()?;
    let config = CoordinatorConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        ..CoordinatorConfig::default()
    };
    let coordinator =
        RunningCoordinator::start(config, Arc::new(SledLog::open(dir.path())?)).await?;
    let inventory = Arc::new(Counters::new("inventory", [("book".to_string(), STOCK)]));
    let cards = (0..CARDS).map(|c| (format!("card-{c}"), CARD_LIMIT));
    let payments = Arc::new(Counters::new("payments", cards));
    let order_db = Arc::new(Orders::default());
    let notifier = Arc::new(Notifier::default());
    let any = || "127.0.0.1:0".parse();
    let inventory_svc = ParticipantServer::new()
        .saga("stock", inventory.clone())
        .spawn(any()?)
        .await?;
    let payments_svc = ParticipantServer::new()
        .saga("cards", payments.clone())
        .spawn(any()?)
        .await?;
    let orders_svc = ParticipantServer::new()
        .check("orders", order_db.clone())
        .spawn(any()?)
        .await?;
    let notify_svc = ParticipantServer::new()
        .message("email", notifier.clone())
        .spawn(any()?)
        .await?;
    let client = TransactionClient::connect(coordinator.url()).await?;
    let urls = (
        inventory_svc.url(),
        payments_svc.url(),
        orders_svc.url(),
        notify_svc.url(),
    );

    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, next, urls, order_db) =
            (client.clone(), next.clone(), urls.clone(), order_db.clone());
        workers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= orders {
                    return results;
                }
                let card = format!("card-{}", i % CARDS);
                let saga = vec![
                    Branch::new(urls.0.clone(), "stock", "book:1"),
                    Branch::new(urls.1.clone(), "cards", format!("{card}:{PRICE}")),
                ];
                let outcome = match client.submit(Mode::Saga, saga).await {
                    Err(Error::Aborted { .. }) => Ok(None),
                    Err(e) => Err(e.to_string()),
                    Ok(_) => {
                        let skip_submit = i % 8 == 3;
                        notify(&client, &order_db, &urls, i, skip_submit)
                            .await
                            .map(|()| Some(skip_submit))
                    }
                };
                results.push(outcome);
            }
        }));
    }
    let mut report = OrderReport {
        orders,
        ..OrderReport::default()
    };
    for w in workers {
        for r in w.await? {
            match r {
                Ok(Some(skipped)) => {
                    report.confirmed += 1;
                    report.checked_back += usize::from(skipped);
                }
                Ok(None) => report.declined += 1,
                Err(e) => report.errors.push(e),
            }
        }
    }
    // The skipped Submits are delivered by the check at their timeout.
    let settle = Instant::now();
    while coordinator.coordinator.live_count() > 0 && settle.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report.elapsed = started.elapsed();
    report.stock_left = inventory.left().values().sum();
    report.charged = CARD_LIMIT * CARDS as i64 - payments.left().values().sum::<i64>();
    report.open_steps = inventory.open_steps() + payments.open_steps();
    let confirmed = order_db.confirmed();
    let sent = notifier.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    report.notified_once = confirmed.iter().filter(|g| sent.get(g) == Some(&1)).count();
    report.wrong_notifications = sent
        .iter()
        .filter(|(g, n)| **n != 1 || !confirmed.contains(g))
        .count();
    for s in [inventory_svc, payments_svc, orders_svc, notify_svc] {
        let _ = s.shutdown().await;
    }
    coordinator.shutdown().await?;
    Ok(report)
}

/// The order service confirms order `i` and notifies by message: prepare,
/// the local transaction (the order and the message's record), Submit.
async fn notify(
    client: &TransactionClient,
    order_db: &Orders,
    urls: &(String, String, String, String),
    i: usize,
    skip_submit: bool,
) -> Result<(), String> {
    let gtid = Gtid::now_v7();
    let check = Branch::new(urls.2.clone(), "orders", "");
    let email = Branch::new(urls.3.clone(), "email", format!("order {i} is confirmed"));
    client
        .prepare_message(gtid, check, vec![email], Some(NOTIFY_TIMEOUT))
        .await
        .map_err(|e| e.to_string())?;
    order_db.confirm(gtid)?;
    if !skip_submit {
        client
            .submit_message(gtid)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

impl fmt::Display for OrderReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "tandem demo --order: a shop's orders across four services (inventory, payments, \
             orders, notifications)"
        )?;
        writeln!(
            f,
            "  each order   saga: reserve the book (inventory), charge the card (payments); \
             then the order service confirms it and notifies by transactional message"
        )?;
        writeln!(
            f,
            "  orders       {} ({} confirmed, {} declined: out of stock or card limit)",
            self.orders, self.confirmed, self.declined
        )?;
        writeln!(
            f,
            "  notified     {} of {} confirmed orders exactly once ({} of them after their \
             Submit was skipped, by the coordinator's back-check); wrong notifications: {}",
            self.notified_once, self.confirmed, self.checked_back, self.wrong_notifications
        )?;
        writeln!(
            f,
            "  stock        {} of {STOCK} left; cards charged {} ({} × {PRICE}); saga steps \
             left open: {}",
            self.stock_left, self.charged, self.confirmed, self.open_steps
        )?;
        writeln!(f, "  errors       {}", self.errors.len())?;
        for e in self.errors.iter().take(5) {
            writeln!(f, "               {e}")?;
        }
        writeln!(
            f,
            "  time         {:.2} s; {}",
            self.elapsed.as_secs_f64(),
            if self.ok() {
                "everything adds up"
            } else {
                "SOMETHING DOES NOT ADD UP"
            }
        )
    }
}
