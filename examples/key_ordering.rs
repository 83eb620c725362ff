//! `ordering = "key"` on the embedded broker: records of one key one at a time and in offset
//! order, different keys at once. `cargo run --example key_ordering`.
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::{collections::BTreeMap, time::Duration};

use sidetrack::mocking::EmbeddedCluster;
use sidetrack::{config::Ordering, handler_fn, Config, Context, Message, Runtime};

#[derive(Default)]
struct Seen {
    per_key: Mutex<BTreeMap<String, Vec<u32>>>,
    running: AtomicUsize,
    most: AtomicUsize,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cluster = EmbeddedCluster::start()?;
    cluster.create_topic("accounts", 1)?; // one partition: all four keys share it
    let mut config = Config::new(cluster.bootstrap_servers(), "ledger", ["accounts"]);
    config.ordering = Ordering::Key; // the default, `Partition`, runs one record at a time
    let seen = Arc::new(Seen::default());
    let state = seen.clone(); // each key's records numbered 0..10 in offset order, below
    let handler = handler_fn(move |msg: Message, _cx: Context| {
        let s = state.clone();
        async move {
            let (key, seq): (String, u32) = (msg.key_str()?.unwrap_or("-").into(), msg.json()?);
            s.most.fetch_max(s.running.fetch_add(1, SeqCst) + 1, SeqCst);
            // Uneven work: a key's later records are often quicker than its earlier ones.
            tokio::time::sleep(Duration::from_millis(5 + (seq as u64 * 7) % 20)).await;
            s.per_key.lock().unwrap().entry(key).or_default().push(seq);
            s.running.fetch_sub(1, SeqCst);
            Ok(())
        }
    });
    let runtime = Runtime::builder(config).handler(handler).embedded(&cluster);
    let handle = runtime.build()?.start().await?;
    let producer = cluster.producer()?;
    for i in 0..40 {
        let key = ["alice", "bob", "carol", "dave"][i % 4];
        let body = (i / 4).to_string();
        let (k, v) = (Some(key.as_bytes()), Some(body.as_bytes()));
        cluster
            .produce(&producer, "accounts", None, k, v, &[])
            .await?;
    }
    while handle.stats().handled < 40 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.shutdown().await?;
    for (key, seqs) in seen.per_key.lock().unwrap().iter() {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{key} out of order");
        println!("{key:<6} handled in offset order: {seqs:?}");
    }
    let most = seen.most.load(SeqCst);
    println!("handler calls at once, at most: {most} (never two of one key)");
    Ok(())
}
