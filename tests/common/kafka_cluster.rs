//! The three-broker Apache Kafka cluster of the replication-fault tests
//! (`testbeds/kafka/start.sh --nodes 3 --dir DIR`): its address from
//! `SIDETRACK_TEST_KAFKA_CLUSTER`, its folder from `SIDETRACK_TEST_KAFKA_CLUSTER_DIR`, and the
//! faults: which node leads a partition or coordinates a group (from metadata), SIGKILL and
//! restart a node (`DIR/node-N/run`), SIGSTOP and SIGCONT one, and waiting until every
//! partition is fully replicated again.
//!
//! A node this helper killed or stopped is restarted or resumed when the helper is dropped
//! (a failing test must not leave the cluster short of a broker for the next one).
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};

/// The address variable.
pub const VAR: &str = "SIDETRACK_TEST_KAFKA_CLUSTER";
/// The folder variable.
pub const DIR_VAR: &str = "SIDETRACK_TEST_KAFKA_CLUSTER_DIR";

/// One partition as the cluster's metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    pub partition: i32,
    /// Node id of the leader, -1 when there is none.
    pub leader: i32,
    pub replicas: Vec<i32>,
    pub isr: Vec<i32>,
}

/// The cluster, and the nodes this test took down.
pub struct KafkaCluster {
    pub bootstrap: String,
    pub dir: PathBuf,
    /// Nodes killed and not restarted yet, and nodes stopped and not resumed yet.
    killed: Mutex<BTreeSet<i32>>,
    stopped: Mutex<BTreeSet<i32>>,
}

impl KafkaCluster {
    /// The cluster named by the environment, or `None` after printing why the test passes
    /// without running.
    pub fn from_env() -> Option<KafkaCluster> {
        let bootstrap = std::env::var(VAR).ok().filter(|b| !b.trim().is_empty());
        let dir = std::env::var(DIR_VAR).ok().filter(|d| !d.trim().is_empty());
        match (bootstrap, dir) {
            (Some(bootstrap), Some(dir)) => Some(KafkaCluster {
                bootstrap,
                dir: PathBuf::from(dir),
                killed: Mutex::default(),
                stopped: Mutex::default(),
            }),
            _ => {
                eprintln!(
                    "skipped on the three-broker cluster: {VAR} and {DIR_VAR} are not both set \
                     (start one with `testbeds/kafka/start.sh --nodes 3 --dir DIR`; see .ci/run)"
                );
                None
            }
        }
    }

    fn node_dir(&self, node: i32) -> PathBuf {
        self.dir.join(format!("node-{node}"))
    }

    /// The node's process id, from `node-N/pid`.
    pub fn pid(&self, node: i32) -> i32 {
        let path = self.node_dir(node).join("pid");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// A broker property of the cluster (every node has the same ones but its own ids).
    pub fn property(&self, key: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.node_dir(1).join("server.properties")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
    }

    /// Every partition of `topic`, from one metadata request (`None` if it failed or the topic
    /// is unknown).
    pub async fn partitions(&self, topic: &str) -> Option<Vec<PartitionInfo>> {
        self.metadata(topic).await.flatten()
    }

    /// Every partition of `topic`: `None` if the request failed, `Some(None)` if the cluster
    /// does not know the topic.
    pub async fn metadata(&self, topic: &str) -> Option<Option<Vec<PartitionInfo>>> {
        let (bootstrap, topic) = (self.bootstrap.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                // A stopped node accepts connections and never answers: give up on it soon.
                .set("socket.timeout.ms", "3000")
                .create()
                .ok()?;
            let md = c
                .fetch_metadata(Some(&topic), Duration::from_secs(3))
                .ok()?;
            let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
                return Some(None);
            };
            match t.error() {
                Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
                    return Some(None)
                }
                // Another error (no leader yet, …): ask again.
                Some(_) => return None,
                None if t.partitions().is_empty() => return None,
                None => {}
            }
            let mut out: Vec<PartitionInfo> = t
                .partitions()
                .iter()
                .map(|p| PartitionInfo {
                    partition: p.id(),
                    leader: p.leader(),
                    replicas: p.replicas().to_vec(),
                    isr: p.isr().to_vec(),
                })
                .collect();
            out.sort_by_key(|p| p.partition);
            Some(Some(out))
        })
        .await
        .ok()
        .flatten()
    }

    /// The node leading `topic`/`partition` (waits up to 60 s for one to be known).
    pub async fn leader(&self, topic: &str, partition: i32) -> i32 {
        poll(Duration::from_secs(60), || async {
            let ps = self.partitions(topic).await?;
            let p = ps.iter().find(|p| p.partition == partition)?;
            (p.leader >= 0).then_some(p.leader)
        })
        .await
        .unwrap_or_else(|| panic!("no leader for {topic}/{partition} in 60 s"))
    }

    /// The `__consumer_offsets` partition holding `group` (Kafka's own rule:
    /// `abs(group.hashCode()) % offsets.topic.num.partitions`); its leader is the group's
    /// coordinator.
    pub fn offsets_partition(&self, group: &str) -> i32 {
        let n: i32 = self
            .property("offsets.topic.num.partitions")
            .and_then(|v| v.parse().ok())
            .unwrap_or(50);
        // Java's String.hashCode over UTF-16 code units.
        let hash = group
            .encode_utf16()
            .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(c as i32));
        // Kafka's Utils.abs: Integer.MIN_VALUE maps to 0.
        let abs = if hash == i32::MIN { 0 } else { hash.abs() };
        abs % n
    }

    /// The node coordinating `group`.
    pub async fn coordinator(&self, group: &str) -> i32 {
        self.leader("__consumer_offsets", self.offsets_partition(group))
            .await
    }

    /// SIGKILLs node `node` and waits until its process is gone.
    pub fn kill(&self, node: i32) {
        let pid = self.pid(node);
        signal("KILL", pid);
        self.killed.lock().unwrap().insert(node);
        let deadline = Instant::now() + Duration::from_secs(30);
        while is_running(pid) {
            assert!(
                Instant::now() < deadline,
                "node {node} ({pid}) survived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts node `node` again with its `run` script, in the background and in a process
    /// group of its own (it outlives the test, as the other nodes do).
    pub fn restart(&self, node: i32) {
        use std::os::unix::process::CommandExt;
        let dir = self.node_dir(node);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("stdout.log"))
            .unwrap();
        let child = Command::new(dir.join("run"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting node {node}: {e}"));
        // `run` writes its own pid (then execs java): wait for it, so `pid` names this one.
        let pid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(dir.join("pid"))
            .ok()
            .as_deref()
            .map(str::trim)
            != Some(pid.to_string().as_str())
        {
            assert!(
                Instant::now() < deadline,
                "node {node} did not write its pid"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Reaped in the background if it ever exits while this process lives.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        self.killed.lock().unwrap().remove(&node);
    }

    /// SIGSTOPs node `node` (its sockets stay open; it answers nothing).
    pub fn stop(&self, node: i32) {
        signal("STOP", self.pid(node));
        self.stopped.lock().unwrap().insert(node);
    }

    /// SIGCONTs node `node`.
    pub fn resume(&self, node: i32) {
        signal("CONT", self.pid(node));
        self.stopped.lock().unwrap().remove(&node);
    }

    /// Waits (up to `limit`) until every partition of `topics` (and of `__consumer_offsets`,
    /// once some group made Kafka create it) has a leader and all its replicas in sync.
    /// Returns how long that took, or `None` at the limit.
    pub async fn wait_fully_replicated(&self, topics: &[String], limit: Duration) -> Option<f64> {
        const OFFSETS: &str = "__consumer_offsets";
        let started = Instant::now();
        let mut all: Vec<String> = topics.to_vec();
        all.push(OFFSETS.into());
        let ok = sidetrack::testing::wait_until(limit, || {
            let all = all.clone();
            async move {
                for t in &all {
                    let ps = match self.metadata(t).await {
                        Some(Some(ps)) => ps,
                        Some(None) if t == OFFSETS => continue,
                        _ => return pause().await,
                    };
                    if ps
                        .iter()
                        .any(|p| p.leader < 0 || p.isr.len() < p.replicas.len())
                    {
                        return pause().await;
                    }
                }
                true
            }
        })
        .await;
        ok.then(|| started.elapsed().as_secs_f64())
    }

    /// Partitions of `topics` not fully in sync now, for messages.
    pub async fn under_replicated(&self, topics: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for t in topics {
            match self.partitions(t).await {
                None => out.push(format!("{t}: no metadata")),
                Some(ps) => out.extend(
                    ps.iter()
                        .filter(|p| p.leader < 0 || p.isr.len() < p.replicas.len())
                        .map(|p| format!("{t}/{}: {p:?}", p.partition)),
                ),
            }
        }
        out
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        let stopped: Vec<i32> = self.stopped.lock().unwrap().iter().copied().collect();
        for node in stopped {
            eprintln!("resuming node {node}, left stopped by the test");
            self.resume(node);
        }
        let killed: Vec<i32> = self.killed.lock().unwrap().iter().copied().collect();
        for node in killed {
            eprintln!("restarting node {node}, left dead by the test");
            self.restart(node);
        }
    }
}

/// Calls `f` every 250 ms (each call may open a client) until it returns a value or `limit`
/// passes.
pub async fn poll<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A short pause between metadata polls (each opens a client); returns false.
async fn pause() -> bool {
    tokio::time::sleep(Duration::from_millis(250)).await;
    false
}

fn signal(name: &str, pid: i32) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}: {status}");
}

/// Whether `pid` runs (a zombie does not count: a killed node whose parent has not reaped it).
fn is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}
