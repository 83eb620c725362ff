//! The HTTP produce proxy on three brokers (`SIDETRACK_TEST_KAFKA_CLUSTER` and
//! `SIDETRACK_TEST_KAFKA_CLUSTER_DIR`, see `tests/common/kafka_cluster.rs`): requests keep coming while
//! the broker leading their partition is SIGKILLed. A 200 must mean every record of the
//! request is in the log at the offset the proxy returned; any other answer must tell the
//! client to come back (503 or 429 with `Retry-After`).
#![cfg(feature = "proxy")]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::kafka_cluster::{self, KafkaCluster};
use common::proxy::*;
use hyper::StatusCode;
use serde_json::json;
use sidetrack::proxy::ProxyConfig;
use sidetrack::testing::wait_until;

/// Requests sent at once (each waits for its answer before the next).
const CLIENTS: usize = 8;
/// Records per request.
const PER_REQUEST: usize = 5;

/// (partition, offset) of a record in an answer; no offset for an implicit acknowledgement.
type Offset = (i32, Option<i64>);

/// One answer as a client saw it.
#[derive(Debug)]
struct Seen {
    /// When the request was sent and when it was answered, relative to the start.
    sent: Duration,
    answered: Duration,
    status: u16,
    retry_after: Option<String>,
    /// The request's record ids, with the (partition, offset) the proxy returned for each.
    records: Vec<(String, Option<Offset>)>,
    body: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_request_never_gets_a_200_for_a_record_not_in_the_log() {
    let Some(cluster) = KafkaCluster::from_env() else {
        return;
    };
    within_limit(async {
        let broker = Broker::Real(Backend::KafkaCluster, cluster.bootstrap.clone());
        let topic = broker.topic("orders", 2).await;
        // A short deadline, so that requests waiting for the new leader are answered in the
        // meantime (the default is 10 s).
        let config = ProxyConfig {
            request_timeout: Duration::from_secs(5),
            ..ProxyConfig::default()
        };
        let proxy = broker.start(config).await;
        let addr = proxy.local_addr();
        // Every request goes to partition 0, the one whose leader dies.
        let path = format!("/topics/{topic}/partitions/0");
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let oks = Arc::new(AtomicUsize::new(0));
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let mut clients = Vec::new();
        for c in 0..CLIENTS {
            let (stop, oks, seen, path) = (stop.clone(), oks.clone(), seen.clone(), path.clone());
            clients.push(tokio::spawn(async move {
                let mut transport_errors = 0;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let ids: Vec<String> = (0..PER_REQUEST).map(|j| format!("c{c}-r{i}-{j}")).collect();
                    i += 1;
                    let body = json!({"records": ids.iter().map(|id| json!({"key": id, "value": id})).collect::<Vec<_>>()});
                    let sent = started.elapsed();
                    match request(addr, "POST", &path, &[("content-type", JSON_V2)], serde_json::to_vec(&body).unwrap()).await {
                        Ok(a) => {
                            let offsets = if a.status == StatusCode::OK {
                                oks.fetch_add(1, Ordering::Relaxed);
                                a.offsets()
                            } else {
                                serde_json::from_slice::<serde_json::Value>(&a.body)
                                    .ok()
                                    .filter(|v| v["offsets"].is_array())
                                    .map(|_| a.offsets())
                                    .unwrap_or_else(|| vec![None; ids.len()])
                            };
                            seen.lock().unwrap().push(Seen {
                                sent,
                                answered: started.elapsed(),
                                status: a.status.as_u16(),
                                retry_after: a
                                    .headers
                                    .get("retry-after")
                                    .map(|v| v.to_str().unwrap_or("?").to_owned()),
                                records: ids.into_iter().zip(offsets).collect(),
                                body: String::from_utf8_lossy(&a.body).chars().take(300).collect(),
                            });
                        }
                        // The proxy itself stays up: a refused or cut connection is counted.
                        Err(_) => {
                            transport_errors += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                transport_errors
            }));
        }
        let ok_before = |n: usize| {
            let oks = oks.clone();
            async move { oks.load(Ordering::Relaxed) >= n }
        };
        assert!(wait_until(WAIT, || ok_before(100)).await, "requests succeed before the fault");

        let leader = cluster.leader(&topic, 0).await;
        let killed_at = started.elapsed();
        cluster.kill(leader);
        // The partition's new leader, as the cluster sees it.
        let moved = kafka_cluster::poll(Duration::from_secs(60), || async {
            let ps = cluster.partitions(&topic).await?;
            let p = ps.iter().find(|p| p.partition == 0)?;
            (p.leader >= 0 && p.leader != leader).then(|| started.elapsed() - killed_at)
        })
        .await;
        // Recovered: 100 requests sent after the kill answered 200.
        let recovered = wait_until(Duration::from_secs(120), || {
            let n = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.sent > killed_at && s.status == 200)
                .count();
            std::future::ready(n >= 100)
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        let mut transport_errors = 0;
        for c in clients {
            transport_errors += c.await.unwrap();
        }
        proxy.shutdown().await;
        cluster.restart(leader);
        let in_sync = cluster
            .wait_fully_replicated(std::slice::from_ref(&topic), Duration::from_secs(180))
            .await;
        assert!(recovered, "the proxy did not answer 200 again within 120 s of the kill");

        let seen = std::mem::take(&mut *seen.lock().unwrap());
        let records = broker.read_all(&topic).await;
        let by_pos: HashMap<(i32, i64), String> = records
            .iter()
            .map(|r| {
                ((r.partition, r.offset), String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned())
            })
            .collect();
        let mut copies: HashMap<&str, usize> = HashMap::new();
        for k in by_pos.values() {
            *copies.entry(k.as_str()).or_default() += 1;
        }
        let duplicates: usize = copies.values().map(|c| c - 1).sum();

        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        let mut read_back = 0;
        let mut not_in_log = Vec::new();
        let mut bad_answers = Vec::new();
        let mut written_anyway = 0;
        let mut partial = 0;
        let mut first_ok_after = None;
        for s in &seen {
            *statuses.entry(s.status).or_default() += 1;
            if s.status == 200 {
                if s.sent > killed_at {
                    let t = s.sent - killed_at;
                    first_ok_after = Some(first_ok_after.map_or(t, |f: Duration| f.min(t)));
                }
                for (id, at) in &s.records {
                    let want = format!("\"{id}\"");
                    match at {
                        Some((p, Some(o))) if by_pos.get(&(*p, *o)) == Some(&want) => read_back += 1,
                        other => not_in_log.push(format!("{id} answered at {other:?}")),
                    }
                }
            } else {
                // What a client may retry: 503 (the broker could not take it by the deadline)
                // or 429 (the proxy's in-flight bound is full of requests waiting for the new
                // leader), each with Retry-After. Anything else would need a reason.
                let retriable = matches!(s.status, 503 | 429) && s.retry_after.is_some();
                if !retriable {
                    bad_answers.push(format!("{} {:?}: {}", s.status, s.retry_after, s.body));
                }
                // A record this answer gives an offset for was written (a partial failure):
                // it must be there too.
                for (id, at) in &s.records {
                    if let Some((p, Some(o))) = at {
                        if by_pos.get(&(*p, *o)) != Some(&format!("\"{id}\"")) {
                            not_in_log.push(format!("{id} answered at {p}:{o} in a {}", s.status));
                        }
                        partial += 1;
                    }
                }
                written_anyway += s
                    .records
                    .iter()
                    .filter(|(id, _)| copies.contains_key(format!("\"{id}\"").as_str()))
                    .count();
            }
        }
        // Time to recover: the longest stretch without a 200 answer (it spans the kill).
        let mut ok_times: Vec<Duration> = seen
            .iter()
            .filter(|s| s.status == 200)
            .map(|s| s.answered)
            .collect();
        ok_times.sort();
        let (gap, gap_from) = ok_times
            .windows(2)
            .map(|w| (w[1] - w[0], w[0]))
            .max()
            .unwrap_or_default();
        let non_200: Vec<String> = statuses
            .iter()
            .filter(|(s, _)| **s != 200)
            .map(|(s, n)| format!("{s}×{n}"))
            .collect();
        println!(
            "proxy on three brokers: SIGKILL node {leader} (leader of {topic}/0) at {:.1}s: leader moved after {}, no 200 answered for {:.1}s (from {:.1}s after the kill), first 200 for a request sent after the kill {}; answers 200={} non-200=[{}] transport errors={transport_errors}; records answered 200={} read back at their offsets={read_back}; records of non-200 answers with an offset={partial}, in the log anyway={written_anyway}; duplicates in the log={duplicates}; replicas in sync {} after the restart; request_timeout=5s, {CLIENTS} clients × {PER_REQUEST} records; {:.1}s",
            killed_at.as_secs_f64(),
            moved.map_or("never".into(), |d| format!("{:.1}s", d.as_secs_f64())),
            gap.as_secs_f64(),
            gap_from.as_secs_f64() - killed_at.as_secs_f64(),
            first_ok_after.map_or("never".into(), |d| format!("{:.1}s", d.as_secs_f64())),
            statuses.get(&200).copied().unwrap_or(0),
            non_200.join(" "),
            statuses.get(&200).copied().unwrap_or(0) * PER_REQUEST,
            in_sync.map_or("never".into(), |s| format!("{s:.1}s")),
            started.elapsed().as_secs_f64(),
        );
        assert!(not_in_log.is_empty(), "answered 200 but not in the log: {not_in_log:?}");
        assert!(bad_answers.is_empty(), "answers a client cannot act on: {bad_answers:?}");
        assert_eq!(transport_errors, 0, "the proxy dropped connections");
        assert_eq!(duplicates, 0, "records written twice");
        assert!(in_sync.is_some(), "replicas not back in sync after the restart");
    })
    .await
}
