//! What the bench binaries (`bench_relay`, `bench_control`, `bench_survive`, `bench_faults`,
//! `soak`) share: reading CPU and memory from `/proc`, describing the machine and where a
//! result came from, parsing `KEY=VALUE` arguments, percentiles, creating calls in bulk and
//! pinning processes to CPUs.
//!
//! Figures only: nothing here asserts a timing. Linux only (`/proc`, `taskset`).

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::time::Duration;

use callbridge_proto::pb;
use serde_json::{Value, json};

use crate::CallsClient;

// === CPU and memory from /proc ===

/// Clock ticks per second (`getconf CLK_TCK`): the unit of the CPU times in `/proc/*/stat`.
pub fn clock_ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        // Linux has used 100 on every mainstream architecture for decades.
        .unwrap_or(100.0)
}

/// The parts of a `/proc/<pid>/stat` (or `/proc/<pid>/task/<tid>/stat`) line the benches use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat<'a> {
    /// The command (thread) name, without its parentheses.
    pub comm: &'a str,
    /// The parent's process id.
    pub ppid: u32,
    /// User-mode CPU time, clock ticks.
    pub utime_ticks: u64,
    /// Kernel-mode CPU time, clock ticks.
    pub stime_ticks: u64,
}

impl<'a> ProcStat<'a> {
    /// Parses a stat line. The command name may hold spaces and parentheses, so the fields
    /// are counted from its LAST `)`. `None` for a malformed line.
    pub fn parse(stat: &'a str) -> Option<Self> {
        let (head, after) = stat.rsplit_once(')')?;
        let (_, comm) = head.split_once('(')?;
        // After `(comm)`: state is field 3 of the line, ppid field 4, utime field 14, stime
        // field 15.
        let mut it = after.split_whitespace().skip(1);
        let ppid = it.next()?.parse().ok()?;
        let mut it = it.skip(9);
        let utime_ticks = it.next()?.parse().ok()?;
        let stime_ticks = it.next()?.parse().ok()?;
        Some(Self {
            comm,
            ppid,
            utime_ticks,
            stime_ticks,
        })
    }

    /// User + kernel CPU time, milliseconds.
    pub fn cpu_ms(&self, clk_tck: f64) -> f64 {
        (self.utime_ticks + self.stime_ticks) as f64 * 1000.0 / clk_tck
    }
}

/// CPU time (ms, user + kernel) a `/proc/…/stat` file reports.
pub fn stat_file_cpu_ms(path: &Path, clk_tck: f64) -> io::Result<f64> {
    let stat = std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))?;
    ProcStat::parse(&stat)
        .map(|s| s.cpu_ms(clk_tck))
        .ok_or_else(|| invalid(format!("malformed {}", path.display())))
}

/// CPU time (ms) process `pid` has used so far.
pub fn process_cpu_ms(pid: u32, clk_tck: f64) -> io::Result<f64> {
    stat_file_cpu_ms(Path::new(&format!("/proc/{pid}/stat")), clk_tck)
}

/// CPU time (ms) this process has used so far.
pub fn self_cpu_ms(clk_tck: f64) -> io::Result<f64> {
    stat_file_cpu_ms(Path::new("/proc/self/stat"), clk_tck)
}

/// CPU time (ms) of this process's threads, summed by thread name. Runtimes name their
/// threads (`loadgen`, `fake-model`, …) so the harness's own parts can be told apart.
pub fn thread_cpu_ms(clk_tck: f64) -> BTreeMap<String, f64> {
    let mut by_name = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return by_name;
    };
    for entry in dir.flatten() {
        // A thread may end between the listing and the read: skip it.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(s) = ProcStat::parse(&stat) {
            *by_name.entry(s.comm.to_owned()).or_insert(0.0) += s.cpu_ms(clk_tck);
        }
    }
    by_name
}

/// `VmRSS` (KiB) from a `/proc/<pid>/status` text.
pub fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident set (KiB) of process `pid`.
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {path}: {e}")))?;
    parse_vm_rss_kib(&status).ok_or_else(|| invalid(format!("no VmRSS in {path}")))
}

/// The 1-minute load average: on a shared machine, other work skews every figure.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
}

/// The machine, for a result file: CPU model, cores, load average now, and `note` (what
/// shares these cores in this bench).
pub fn machine(note: &str) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_owned())
            })
        })
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": cores(),
        "load_average_at_start": load_average(),
        "note": note,
    })
}

/// Where a result file came from, so a figure in the docs can be traced: the commit (and
/// whether the tree had uncommitted changes, result files under docs/results and
/// docs/performance aside), the command as run, and when it finished
/// (seconds since the Unix epoch). `git` missing or no repository: `commit` is "unknown".
pub fn provenance() -> Value {
    provenance_at(Path::new("."))
}

/// [`provenance`] of the repository at `dir`.
fn provenance_at(dir: &Path) -> Value {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let finished = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    json!({
        "commit": git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".to_owned()),
        // Result files are not code: a bench that just rewrote docs/results/relay.json must
        // not mark the next bench's run as made from a changed tree.
        "dirty": git(&[
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ":(top)",
            ":(top,exclude)docs/results",
            ":(top,exclude)docs/performance",
        ])
        .is_some_and(|s| !s.is_empty()),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "finished_unix": finished,
    })
}

/// Writes a result file, creating its directory.
pub fn write_result(path: &Path, doc: &Value) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(doc).map_err(io::Error::other)?;
    std::fs::write(path, text + "\n")
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

// === CPU pinning ===

/// Where `taskset` (util-linux) is looked for first; else `PATH`.
const TASKSET: &str = "/usr/bin/taskset";

/// Checks a CPU list as `taskset -c` takes it (`1`, `0,1`, `0-3,6`), so a typo fails at
/// argument parsing rather than after the bench has started processes.
/// How many CPUs a list checked by [`parse_cpu_list`] names (`0-3,6` → 5).
pub fn cpu_count(list: &str) -> usize {
    list.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => match (a.parse::<usize>(), b.parse::<usize>()) {
                (Ok(a), Ok(b)) => b.saturating_sub(a) + 1,
                _ => 0,
            },
            None => 1,
        })
        .sum()
}

pub fn parse_cpu_list(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.split(',').all(|part| {
            let mut ends = part.splitn(2, '-');
            let a = ends.next().map(str::parse::<u32>);
            let b = ends.next().map(str::parse::<u32>);
            match (a, b) {
                (Some(Ok(_)), None) => true,
                (Some(Ok(a)), Some(Ok(b))) => a <= b,
                _ => false,
            }
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "expected a CPU list like 1 or 0,1 or 0-3, got {s:?}"
        ))
    }
}

/// Pins every thread of process `pid` (and so the threads it starts later) to `cpus`, with
/// `taskset -a -p -c`. Used instead of a `sched_setaffinity` call: the workspace forbids
/// `unsafe`, and the processes are started by `callbridge_testkit::procs`, not by us.
pub fn pin_process(pid: u32, cpus: &str) -> io::Result<()> {
    let bin = if Path::new(TASKSET).exists() {
        TASKSET
    } else {
        "taskset"
    };
    let out = std::process::Command::new(bin)
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "taskset -a -p -c {cpus} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Child processes of this process whose command name is `comm` (e.g. `redis-server`,
/// started by `callbridge_testkit::redis_server`, which does not expose its pid).
pub fn children_named(comm: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .as_deref()
                .and_then(ProcStat::parse)
                .is_some_and(|s| s.ppid == me && s.comm == comm)
        })
        .collect()
}

/// The CPUs each thread of `pid` may run on (`Cpus_allowed_list`), distinct values: after
/// pinning this should be exactly the list asked for.
pub fn cpus_allowed(pid: u32) -> Vec<String> {
    let mut lists: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_owned())
        })
        .collect();
    lists.sort();
    lists.dedup();
    lists
}

// === arguments and figures ===

/// Parses a `KEY=VALUE` argument (extra environment for a process under test).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// The `p`-th percentile (0..=100) of `sorted` (ascending), nearest-rank: the smallest
/// value with at least p% of the values at or below it. `None` when empty.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    // The tolerance keeps float error from pushing an exact rank to the next one
    // (99.9% of 1,000 is rank 999, not 999.000…1 → 1,000).
    let rank = (p * sorted.len() as f64 / 100.0 - 1e-9).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The most of `times` (in any order) that fall in one window of length `window`: the
/// busiest stretch of a paced series.
pub fn max_in_window(times: &[Duration], window: Duration) -> usize {
    let mut sorted = times.to_vec();
    sorted.sort();
    let mut best = 0;
    let mut start = 0;
    for end in 0..sorted.len() {
        while sorted[end] - sorted[start] >= window {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// A number deep in a JSON result (`&["rtt_ms", "p99"]`); NaN when absent.
pub fn json_f64(v: &Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_f64()
        .unwrap_or(f64::NAN)
}

/// A count deep in a JSON result; 0 when absent.
pub fn json_u64(v: &Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or(0)
}

// === calls through control ===

/// `CreateCalls` takes at most this many calls per request.
const CREATE_BATCH: usize = 500;

/// Creates `n` outbound calls of `agent_id` in campaign `campaign` with `Calls.CreateCalls`
/// (in batches of 500); their ids, in order. Each batch must answer within `step`.
pub async fn create_calls(
    calls: &mut CallsClient,
    agent_id: &str,
    n: usize,
    campaign: &str,
    step: Duration,
) -> Result<Vec<String>, tonic::Status> {
    let mut ids = Vec::with_capacity(n);
    let all: Vec<usize> = (0..n).collect();
    for chunk in all.chunks(CREATE_BATCH) {
        let req = pb::CreateCallsRequest {
            campaign_id: campaign.to_owned(),
            calls: chunk
                .iter()
                .map(|i| pb::CreateCallRequest {
                    agent_id: agent_id.to_owned(),
                    direction: pb::Direction::Outbound as i32,
                    from: "+14155550100".to_owned(),
                    to: format!("+1415556{:04}", i % 10_000),
                    campaign_id: campaign.to_owned(),
                    metadata: Default::default(),
                    dial: None,
                })
                .collect(),
        };
        let created = tokio::time::timeout(step, calls.create_calls(req))
            .await
            .map_err(|_| {
                tonic::Status::deadline_exceeded(format!("CreateCalls: no answer in {step:?}"))
            })??
            .into_inner();
        ids.extend(
            created
                .calls
                .into_iter()
                .filter_map(|c| c.call.map(|c| c.call_id)),
        );
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parentheses_in_the_name() {
        // Fields 14 and 15 (utime, stime) are 1234 and 56; the name holds ") (" and spaces.
        let line = "4242 (my (odd) name ) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 56 0 0 20 0 \
                    3 0 777 1000 200 18446744073709551615";
        let s = ProcStat::parse(line).expect("parses");
        assert_eq!(s.comm, "my (odd) name ");
        assert_eq!(s.ppid, 1);
        assert_eq!((s.utime_ticks, s.stime_ticks), (1234, 56));
        assert!((s.cpu_ms(100.0) - 12_900.0).abs() < 1e-9);
        assert!((s.cpu_ms(250.0) - 5_160.0).abs() < 1e-9);
    }

    #[test]
    fn the_busiest_window_counts_unsorted_times_and_excludes_its_end() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|&m| Duration::from_millis(m))
                .collect::<Vec<_>>()
        };
        let times = ms(&[900, 0, 100, 1_000, 1_050, 1_999]);
        // 100, 900, 1000 and 1050 share a second; 0 and 1000 do not (a window excludes
        // its end), nor 1050 and 1999.
        assert_eq!(max_in_window(&times, Duration::from_secs(1)), 4);
        assert_eq!(max_in_window(&times, Duration::from_millis(100)), 2);
        assert_eq!(max_in_window(&[], Duration::from_secs(1)), 0);
    }

    #[test]
    fn malformed_stat_is_none() {
        assert_eq!(ProcStat::parse(""), None);
        assert_eq!(ProcStat::parse("1 (x) S 1 2 3"), None);
        assert_eq!(
            ProcStat::parse("1 (x) S 1 1 1 0 -1 0 0 0 0 0 ten 5"),
            None,
            "non-numeric utime"
        );
    }

    #[test]
    fn own_stat_parses_and_cpu_time_grows() {
        let clk = clock_ticks_per_sec();
        assert!(clk > 0.0);
        let stat = std::fs::read_to_string("/proc/self/stat").expect("own stat");
        let s = ProcStat::parse(&stat).expect("own stat parses");
        assert!(!s.comm.is_empty());
        let before = self_cpu_ms(clk).expect("own cpu");
        // Spin until the tick counter moves (bounded: a few clock ticks of work).
        let mut x = 0u64;
        let mut after = before;
        for _ in 0..2_000 {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
            after = self_cpu_ms(clk).expect("own cpu");
            if after > before {
                break;
            }
        }
        assert!(
            after > before,
            "CPU time did not advance: {before} → {after}"
        );
        let me = std::process::id();
        assert!(process_cpu_ms(me, clk).expect("by pid") >= after);
        assert!(!thread_cpu_ms(clk).is_empty());
    }

    #[test]
    fn rss_from_status() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    5120 kB\nRssAnon:\t 100 kB\n";
        assert_eq!(parse_vm_rss_kib(status), Some(5120));
        assert_eq!(parse_vm_rss_kib("Name:\tx\n"), None);
        assert!(rss_kib(std::process::id()).expect("own rss") > 0);
        assert!(rss_kib(u32::MAX).is_err());
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<u32> = (1..=10).collect();
        assert_eq!(percentile(&v, 50.0), Some(5));
        assert_eq!(percentile(&v, 51.0), Some(6));
        assert_eq!(percentile(&v, 90.0), Some(9));
        assert_eq!(percentile(&v, 99.0), Some(10));
        assert_eq!(percentile(&v, 100.0), Some(10));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7u32], 99.0), Some(7));
        assert_eq!(percentile::<u32>(&[], 50.0), None);
        let w: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&w, 99.0), Some(990));
        assert_eq!(percentile(&w, 99.9), Some(999));
    }

    #[test]
    fn key_value_arguments() {
        assert_eq!(
            parse_key_value("RELAY_LOG=info,x=y"),
            Ok(("RELAY_LOG".to_owned(), "info,x=y".to_owned()))
        );
        assert_eq!(parse_key_value("A="), Ok(("A".to_owned(), String::new())));
        assert!(parse_key_value("RELAY_LOG").is_err());
    }

    #[test]
    fn cpu_lists() {
        for ok in ["1", "0,1", "0-3", "0-1,4,6-7"] {
            assert_eq!(parse_cpu_list(ok), Ok(ok.to_owned()));
        }
        for bad in ["", "a", "1,", "3-1", "-1", "1-", "0,,1", "1 2"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn pinning_a_child_restricts_every_thread() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id();
        let found = children_named("sleep");
        let pinned = pin_process(pid, "0");
        let allowed = cpus_allowed(pid);
        let _ = child.kill();
        let _ = child.wait();
        pinned.expect("taskset");
        assert_eq!(allowed, vec!["0".to_owned()]);
        assert!(found.contains(&pid), "{pid} not among {found:?}");
        assert!(pin_process(u32::MAX, "0").is_err());
    }

    #[test]
    fn json_lookups() {
        let v = json!({"rtt_ms": {"p99": 2.5, "n": 7}});
        assert_eq!(json_f64(&v, &["rtt_ms", "p99"]), 2.5);
        assert!(json_f64(&v, &["rtt_ms", "missing"]).is_nan());
        assert_eq!(json_u64(&v, &["rtt_ms", "n"]), 7);
        assert_eq!(json_u64(&v, &["nope"]), 0);
    }

    #[test]
    fn provenance_ignores_result_files_but_not_code() {
        // A scratch repository, so the check does not depend on this worktree's state.
        let dir = std::env::temp_dir().join(format!("cb-prov-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("docs/results")).expect("dirs");
        let git = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@t", "-C"])
                .arg(&dir)
                .args(args)
                .output()
                .expect("git")
                .status
                .success();
            assert!(ok, "git {args:?}");
        };
        std::fs::write(dir.join("docs/results/r.json"), "{}").expect("write");
        std::fs::write(dir.join("code.rs"), "fn main() {}").expect("write");
        git(&["init", "-q"]);
        git(&["add", "."]);
        git(&["commit", "-qm", "start"]);
        let dirty = || {
            provenance_at(&dir)["dirty"]
                .as_bool()
                .expect("dirty is a bool")
        };
        assert!(!dirty(), "clean tree");
        std::fs::write(dir.join("docs/results/r.json"), "{\"x\": 1}").expect("write");
        assert!(!dirty(), "a rewritten result file is not a code change");
        std::fs::write(dir.join("code.rs"), "fn main() { }").expect("write");
        assert!(dirty(), "a changed source file is");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn machine_describes_this_box() {
        let m = machine("just the test");
        assert_eq!(m["note"], "just the test");
        assert_eq!(m["cores"].as_u64(), Some(cores() as u64));
        assert!(cores() >= 1);
        assert!(load_average().is_some_and(|l| l >= 0.0));
    }
}

// === Counting what a process does, per frame ===

/// Samples of Prometheus counters: `name{labels}` → value, for every line of `text` whose
/// name starts with `prefix`.
pub fn prometheus_samples(text: &str, prefix: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// System calls, context switches and (when `perf probe` could place them) heap
/// allocations of a process over a window, counted by `perf stat` in the kernel: no
/// sampling, no change to the process. Absent when `perf` is not installed or may not
/// trace (then the bench prints `-`).
#[derive(Debug, Clone)]
pub struct PerfCounts {
    events: Vec<&'static str>,
}

/// Every system call, and the ones the relay's audio path makes.
const SYSCALL_EVENTS: [&str; 10] = [
    "raw_syscalls:sys_enter",
    "syscalls:sys_enter_recvfrom",
    "syscalls:sys_enter_read",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_write",
    "syscalls:sys_enter_writev",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_futex",
    "syscalls:sys_enter_sched_yield",
    "context-switches",
];
/// glibc's allocation entry points, as `perf probe` names them.
const ALLOC_EVENTS: [&str; 3] = [
    "probe_libc:malloc",
    "probe_libc:realloc",
    "probe_libc:calloc",
];
/// Where glibc lives on the distributions the bench runs on.
const LIBC_PATHS: [&str; 4] = [
    "/lib/x86_64-linux-gnu/libc.so.6",
    "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "/lib/aarch64-linux-gnu/libc.so.6",
    "/lib64/libc.so.6",
];

fn perf_can_count(events: &[&str]) -> bool {
    std::process::Command::new("perf")
        .args(["stat", "-x,", "-e", &events.join(","), "--", "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl PerfCounts {
    /// What this machine lets `perf stat` count; `None` without perf or tracepoints.
    /// Places uprobes on glibc's allocator when they are missing (needs root; without,
    /// allocations are not counted).
    pub fn detect() -> Option<Self> {
        if !perf_can_count(&SYSCALL_EVENTS) {
            return None;
        }
        let mut events = SYSCALL_EVENTS.to_vec();
        if !perf_can_count(&ALLOC_EVENTS)
            && let Some(libc) = LIBC_PATHS.iter().find(|p| Path::new(p).exists())
        {
            let _ = std::process::Command::new("perf")
                .args([
                    "probe", "-q", "-x", libc, "--add", "malloc", "--add", "realloc",
                ])
                .args(["--add", "calloc"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        if perf_can_count(&ALLOC_EVENTS) {
            events.extend(ALLOC_EVENTS);
        }
        Some(Self { events })
    }

    /// Whether allocations are counted.
    pub fn counts_allocations(&self) -> bool {
        self.events.contains(&ALLOC_EVENTS[0])
    }

    /// Counts the events of process `pid` (every thread) for `window`; blocks.
    pub fn count(&self, pid: u32, window: Duration) -> io::Result<BTreeMap<String, u64>> {
        let out = std::process::Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-e",
                &self.events.join(","),
                "-p",
                &pid.to_string(),
            ])
            .args(["--", "sleep", &format!("{:.3}", window.as_secs_f64())])
            .stdout(std::process::Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "perf stat: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(parse_perf_csv(&String::from_utf8_lossy(&out.stderr)))
    }
}

/// `perf stat -x,` output: `count,unit,event,…` per line; uncounted events are left out.
pub fn parse_perf_csv(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(',');
            let count = f.next()?.trim().parse().ok()?;
            let _unit = f.next()?;
            Some((f.next()?.trim().to_owned(), count))
        })
        .collect()
}

#[cfg(test)]
mod counting_tests {
    use super::*;

    #[test]
    fn counts_cpus_in_a_list() {
        assert_eq!(cpu_count("1"), 1);
        assert_eq!(cpu_count("0-3,6"), 5);
        assert_eq!(cpu_count("0,1"), 2);
    }

    #[test]
    fn reads_prometheus_samples_and_perf_csv() {
        let text = "# HELP x\ncallbridge_relay_ws_messages_total{socket=\"twilio\",direction=\"in\"} 42\ncallbridge_relay_frames_total{direction=\"caller_to_model\"} 7\nother 1\n";
        let m = prometheus_samples(text, "callbridge_relay_");
        assert_eq!(
            m.get("callbridge_relay_ws_messages_total{socket=\"twilio\",direction=\"in\"}"),
            Some(&42.0)
        );
        assert_eq!(m.len(), 2);
        let csv = "1234,,raw_syscalls:sys_enter,2000000,100.00,,\n<not counted>,,probe_libc:malloc,0,100.00,,\n17,,context-switches,2000000,100.00,,\n";
        let c = parse_perf_csv(csv);
        assert_eq!(c.get("raw_syscalls:sys_enter"), Some(&1234));
        assert_eq!(c.get("context-switches"), Some(&17));
        assert!(!c.contains_key("probe_libc:malloc"));
    }
}
