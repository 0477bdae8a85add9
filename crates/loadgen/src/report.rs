//! Turning runs into a report: raw JSON, a markdown section for `docs/benchmarks.md` (between
//! [`BEGIN`] and [`END`], the rest of the file untouched) and SVG charts.

use std::path::Path;
use std::process::Command;

use plotters::prelude::*;
use serde::Serialize;

use crate::Error;
use crate::scenarios::{Case, RunResult};
use crate::server::Target;

/// Opening marker of the generated section.
pub const BEGIN: &str = "<!-- loadgen:begin -->";
/// Closing marker of the generated section.
pub const END: &str = "<!-- loadgen:end -->";

/// Where and when the runs happened.
#[derive(Clone, Debug, Serialize)]
pub struct Meta {
    /// UTC date, `YYYY-MM-DD`.
    pub date: String,
    /// `git rev-parse HEAD` (with `-dirty` when the tree has changes), if in a repository.
    pub commit: String,
    /// CPU model, cores, memory, kernel.
    pub machine: String,
    /// Load average before the runs.
    pub load_before: String,
    /// Load average after the runs.
    pub load_after: String,
    /// `etcd --version`, or why it was skipped.
    pub etcd: String,
    /// The command line.
    pub command: String,
    /// Quick sizes.
    pub quick: bool,
    /// The disk's fsync latency before the runs (`None` when the probe failed).
    pub fsync_before: Option<crate::fsync::FsyncProbe>,
    /// The same after the runs.
    pub fsync_after: Option<crate::fsync::FsyncProbe>,
}

impl Meta {
    /// Collects what the machine says about itself.
    pub fn collect(etcd: Option<&Path>, command: String, quick: bool) -> Meta {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map_or("?".into(), |kb| format!("{:.1} GiB", kb as f64 / 1048576.0));
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or("?".into(), |s| s.trim().to_owned());
        let etcd = match etcd {
            Some(bin) => output(Command::new(bin).arg("--version"))
                .and_then(|s| s.lines().next().map(str::to_owned))
                .unwrap_or_else(|| "etcd (version unknown)".into()),
            None => "not installed: skipped, keywatch measured alone".into(),
        };
        Meta {
            date: today(),
            commit: commit(),
            machine: format!("{cpu}, {cores} vCPU, {mem} RAM, Linux {kernel}"),
            load_before: load(),
            load_after: String::new(),
            etcd,
            command,
            quick,
            fsync_before: fsync_probe(),
            fsync_after: None,
        }
    }

    /// Records the load average at the end.
    pub fn finish(&mut self) {
        self.load_after = load();
        self.fsync_after = fsync_probe();
    }

    /// The median fsync latency of the run: the mean of the before and after probes' medians.
    pub fn fsync_p50_ms(&self) -> Option<f64> {
        let p50s: Vec<f64> = [&self.fsync_before, &self.fsync_after]
            .into_iter()
            .flatten()
            .map(|p| p.p50_ms)
            .collect();
        (!p50s.is_empty()).then(|| p50s.iter().sum::<f64>() / p50s.len() as f64)
    }
}

/// Fsync samples per probe: a fraction of a second on a disk at the usual 0.1–2 ms.
const FSYNC_SAMPLES: usize = 200;

fn fsync_probe() -> Option<crate::fsync::FsyncProbe> {
    match crate::fsync::probe(FSYNC_SAMPLES) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("loadgen: {e}");
            None
        }
    }
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn commit() -> String {
    let Some(head) = output(Command::new("git").args(["rev-parse", "HEAD"])) else {
        return "unknown".into();
    };
    let dirty = output(Command::new("git").args(["status", "--porcelain", "--untracked-files=no"]))
        .is_some_and(|s| !s.is_empty());
    if dirty { format!("{head}-dirty") } else { head }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Today's UTC date from the system clock (civil-from-days, no date crate needed).
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Everything one invocation measured: the raw JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Where and when.
    pub meta: Meta,
    /// The sizes used.
    pub sizes: crate::Sizes,
    /// Every run.
    pub runs: Vec<RunResult>,
    /// The targets, evaluated.
    pub targets: Vec<TargetRow>,
}

impl Report {
    /// Builds the report and evaluates the targets.
    pub fn new(meta: Meta, sizes: crate::Sizes, runs: Vec<RunResult>) -> Report {
        let targets = targets(&meta, &runs);
        Report {
            meta,
            sizes,
            runs,
            targets,
        }
    }

    /// True when every run was correct.
    pub fn correct(&self) -> bool {
        self.runs.iter().all(|r| r.verdict.ok())
    }

    fn pair(&self, case: &Case) -> (Option<&RunResult>, Option<&RunResult>) {
        let find = |t| self.runs.iter().find(|r| r.target == t && r.case == *case);
        (find(Target::Keywatch), find(Target::Etcd))
    }
}

/// One of the targets, evaluated.
#[derive(Clone, Debug, Serialize)]
pub struct TargetRow {
    /// What is compared.
    pub what: String,
    /// The target.
    pub target: String,
    /// keywatch's figure.
    pub keywatch: String,
    /// etcd's figure.
    pub etcd: String,
    /// Met, not met, or not measured.
    pub met: Option<bool>,
}

/// Which way a metric is better.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

/// Rows shown per scenario: (label, how to read it from a run, which way is better).
type Getter = fn(&RunResult) -> Option<f64>;

fn rows(case: &Case) -> Vec<(&'static str, Getter, Better)> {
    use Better::{Higher, Lower};
    let ev_p50: Getter = |r| r.event_latency.as_ref().map(|l| l.p50_ms);
    let ev_p99: Getter = |r| r.event_latency.as_ref().map(|l| l.p99_ms);
    let ev_p999: Getter = |r| r.event_latency.as_ref().map(|l| l.p999_ms);
    let ev_max: Getter = |r| r.event_latency.as_ref().map(|l| l.max_ms);
    match case {
        Case::Fanout { .. } => vec![
            ("delivered events/s", |r| r.metric("events_per_s"), Higher),
            ("put→event p50 ms", ev_p50, Lower),
            ("put→event p99 ms", ev_p99, Lower),
            ("put→event p99.9 ms", ev_p999, Lower),
            ("put→event max ms", ev_max, Lower),
            (
                "events per watch response",
                |r| r.metric("events_per_response"),
                Higher,
            ),
            (
                "server CPU s per million events",
                |r| r.metric("server_cpu_s_per_m_events"),
                Lower,
            ),
        ],
        Case::Spread { .. } => vec![
            ("durable puts/s", |r| r.metric("puts_per_s"), Higher),
            (
                "put p50 ms",
                |r| r.put_latency.as_ref().map(|l| l.p50_ms),
                Lower,
            ),
            (
                "put p99 ms",
                |r| r.put_latency.as_ref().map(|l| l.p99_ms),
                Lower,
            ),
            ("put→event p99 ms", ev_p99, Lower),
            (
                "server CPU µs per put",
                |r| r.metric("server_cpu_us_per_put"),
                Lower,
            ),
            (
                "serializable Range p50 ms (same clients)",
                |r| r.metric("range_p50_ms"),
                Lower,
            ),
            (
                "serializable Range p99 ms (same clients)",
                |r| r.metric("range_p99_ms"),
                Lower,
            ),
        ],
        Case::History { .. } => vec![
            ("replay time s", |r| r.metric("replay_s"), Lower),
            ("replayed events/s", |r| r.metric("events_per_s"), Higher),
            (
                "events per watch response",
                |r| r.metric("events_per_response"),
                Higher,
            ),
        ],
        Case::Register { .. } => vec![
            (
                "registrations/s",
                |r| r.metric("registrations_per_s"),
                Higher,
            ),
            (
                "server RSS per watcher, bytes",
                |r| r.metric("rss_per_watcher_b"),
                Lower,
            ),
        ],
        Case::Stalled { .. } => vec![
            ("healthy put→event p50 ms", ev_p50, Lower),
            ("healthy put→event p99 ms", ev_p99, Lower),
            ("healthy put→event max ms", ev_max, Lower),
        ],
        Case::Large { .. } => vec![
            ("load time s", |r| r.metric("load_s"), Lower),
            ("restart to serving s", |r| r.metric("restart_s"), Lower),
            ("server RSS MiB", |r| r.metric("rss_mib"), Lower),
            ("on-disk MiB", |r| r.metric("disk_mib"), Lower),
            (
                "one-key Range at an old revision p99 ms",
                |r| r.metric("history_range_p99_ms"),
                Lower,
            ),
            (
                "compaction after 10 % churn s",
                |r| r.metric("compact_s"),
                Lower,
            ),
            (
                "put p99 during it ms",
                |r| r.metric("put_p99_compaction_ms"),
                Lower,
            ),
            (
                "put p99 steady ms",
                |r| r.metric("put_p99_steady_ms"),
                Lower,
            ),
            (
                "first compaction (whole load) s",
                |r| r.metric("compact_first_s"),
                Lower,
            ),
            (
                "put p99 during the first ms",
                |r| r.metric("put_p99_first_compaction_ms"),
                Lower,
            ),
            (
                "RSS after restart MiB",
                |r| r.metric("rss_after_restart_mib"),
                Lower,
            ),
        ],
    }
}

/// keywatch's advantage: > 1 means keywatch is better by that factor.
fn advantage(kw: f64, etcd: f64, better: Better) -> Option<f64> {
    let (num, den) = match better {
        Better::Higher => (kw, etcd),
        Better::Lower => (etcd, kw),
    };
    (den > 0.0).then(|| num / den)
}

/// A number with sensible precision.
pub fn fmt(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 {
        let n = v.round() as i64;
        let digits = n.unsigned_abs().to_string();
        let mut out = String::new();
        for (i, ch) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(ch);
        }
        if n < 0 { format!("-{out}") } else { out }
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The one-line summary printed after each run.
pub fn headline(r: &RunResult) -> String {
    rows(&r.case)
        .iter()
        .take(3)
        .filter_map(|(label, get, _)| get(r).map(|v| format!("{label} {}", fmt(v))))
        .collect::<Vec<_>>()
        .join(", ")
}

fn targets(meta: &Meta, runs: &[RunResult]) -> Vec<TargetRow> {
    let pair = |pred: &dyn Fn(&Case) -> bool| {
        let find = |t| runs.iter().find(|r| r.target == t && pred(&r.case));
        (find(Target::Keywatch), find(Target::Etcd))
    };
    let mut out = Vec::new();
    let mut fanout_cases: Vec<&Case> = runs
        .iter()
        .filter(|r| r.target == Target::Keywatch && matches!(r.case, Case::Fanout { .. }))
        .map(|r| &r.case)
        .collect();
    fanout_cases.dedup();
    for case in fanout_cases {
        let (kw, etcd) = pair(&|c| c == case);
        let p99 =
            |r: Option<&RunResult>| r.and_then(|r| r.event_latency.as_ref()).map(|l| l.p99_ms);
        let eps = |r: Option<&RunResult>| r.and_then(|r| r.metric("events_per_s"));
        let show = |r: Option<&RunResult>| match (p99(r), eps(r)) {
            (Some(p), Some(e)) => format!("p99 {} ms at {} ev/s", fmt(p), fmt(e)),
            _ => "—".into(),
        };
        // Issue 13's targets: unpaced cases need throughput and half etcd's p99; paced cases
        // (on a quiet or a loaded machine) a twentieth of its p99.
        let (target, met) = match case {
            Case::Fanout { rate: Some(_), .. } => (
                "p99 ≤ 1/20 of etcd's".to_owned(),
                match (p99(kw), p99(etcd)) {
                    (Some(pk), Some(pe)) => Some(pk * 20.0 <= pe),
                    _ => None,
                },
            ),
            Case::Fanout { watchers, .. } => {
                let x = if *watchers >= 10_000 { 1.5 } else { 2.0 };
                (
                    format!("≥ {x}× etcd's events/s, p99 ≤ 1/2 of etcd's"),
                    match (p99(kw), p99(etcd), eps(kw), eps(etcd)) {
                        (Some(pk), Some(pe), Some(ek), Some(ee)) => {
                            Some(pk * 2.0 <= pe && ek >= x * ee)
                        }
                        _ => None,
                    },
                )
            }
            _ => continue,
        };
        out.push(TargetRow {
            what: format!("fan-out {case}"),
            target,
            keywatch: show(kw),
            etcd: show(etcd),
            met,
        });
        if matches!(case, Case::Fanout { rate: None, .. }) {
            let cpu = |r: Option<&RunResult>| r.and_then(|r| r.metric("server_cpu_s_per_m_events"));
            let show = |r| cpu(r).map_or("—".into(), |v| format!("{} s", fmt(v)));
            out.push(TargetRow {
                what: format!("server CPU per million events, fan-out {case}"),
                target: "≤ 1/3 of etcd's".into(),
                keywatch: show(kw),
                etcd: show(etcd),
                met: match (cpu(kw), cpu(etcd)) {
                    (Some(a), Some(b)) => Some(a * 3.0 <= b),
                    _ => None,
                },
            });
        }
    }
    // Stalled watchers: the healthy watchers' p99 with them, over their p99 without them.
    let stalled_p99 = |t: Target, with: bool| {
        runs.iter()
            .find(|r| {
                r.target == t
                    && matches!(r.case, Case::Stalled { stalled, .. } if (stalled > 0) == with)
            })
            .and_then(|r| r.event_latency.as_ref())
            .map(|l| l.p99_ms)
    };
    let ratio = |t| match (stalled_p99(t, true), stalled_p99(t, false)) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let show = |t| ratio(t).map_or("—".into(), |v| format!("{}×", fmt(v)));
    out.push(TargetRow {
        what: "stalled watchers: healthy p99 with them / without".into(),
        target: "≤ 2×".into(),
        keywatch: show(Target::Keywatch),
        etcd: show(Target::Etcd),
        met: ratio(Target::Keywatch).map(|r| r <= 2.0),
    });
    // The issue-14 targets are judged on the first spread case (8 writers in the full sizes).
    let first_writers = runs.iter().find_map(|r| match r.case {
        Case::Spread { writers, .. } => Some(writers),
        _ => None,
    });
    let (kw, etcd) =
        pair(&|c| matches!(c, Case::Spread { writers, .. } if Some(*writers) == first_writers));
    let puts = |r: Option<&RunResult>| r.and_then(|r| r.metric("puts_per_s"));
    let p99 = |r: Option<&RunResult>| r.and_then(|r| r.put_latency.as_ref()).map(|l| l.p99_ms);
    let show = |r: Option<&RunResult>| match (puts(r), p99(r)) {
        (Some(a), Some(b)) => format!("{} puts/s, p99 {} ms", fmt(a), fmt(b)),
        _ => "—".into(),
    };
    out.push(TargetRow {
        what: "spread durable puts".into(),
        target: "≥ 3× etcd's puts/s, p99 ≤ 1/2".into(),
        keywatch: show(kw),
        etcd: show(etcd),
        met: match (puts(kw), puts(etcd), p99(kw), p99(etcd)) {
            (Some(a), Some(b), Some(c), Some(d)) => Some(a >= 3.0 * b && c * 2.0 <= d),
            _ => None,
        },
    });
    let p50 = |r: Option<&RunResult>| r.and_then(|r| r.put_latency.as_ref()).map(|l| l.p50_ms);
    // The same clients' serializable Range p50: the part of a put's latency that is not its
    // durability (no disk wait), so the target's room above it shows.
    let range_floor = |r: Option<&RunResult>| {
        r.and_then(|r| r.metric("range_p50_ms"))
            .map_or(String::new(), |v| format!("; a Range takes {} ms", fmt(v)))
    };
    let fsync = meta.fsync_p50_ms();
    let writers = match kw.map(|r| &r.case) {
        Some(Case::Spread { writers, .. }) => writers.to_string(),
        _ => "?".into(),
    };
    out.push(TargetRow {
        what: format!("spread put p50 ({writers} writers) vs the disk's fsync p50"),
        target: "≤ 2.5× the fsync p50 of the same run".into(),
        keywatch: match (p50(kw), fsync) {
            (Some(p), Some(f)) => format!(
                "{} ms = {}× fsync {} ms{}",
                fmt(p),
                fmt(p / f),
                fmt(f),
                range_floor(kw)
            ),
            _ => "—".into(),
        },
        etcd: match (p50(etcd), fsync) {
            (Some(p), Some(f)) => {
                format!("{} ms = {}× fsync{}", fmt(p), fmt(p / f), range_floor(etcd))
            }
            _ => "—".into(),
        },
        met: match (p50(kw), fsync) {
            (Some(p), Some(f)) => Some(p <= 2.5 * f),
            _ => None,
        },
    });
    let simple = |pred: &dyn Fn(&Case) -> bool,
                  what: &str,
                  target: &str,
                  metric: &str,
                  unit: &str,
                  ok: &dyn Fn(f64, f64) -> bool| {
        let (kw, etcd) = pair(pred);
        let get = |r: Option<&RunResult>| r.and_then(|r| r.metric(metric));
        let show = |r| get(r).map_or("—".into(), |v| format!("{} {unit}", fmt(v)));
        TargetRow {
            what: what.into(),
            target: target.into(),
            keywatch: show(kw),
            etcd: show(etcd),
            met: match (get(kw), get(etcd)) {
                (Some(a), Some(b)) => Some(ok(a, b)),
                _ => None,
            },
        }
    };
    out.push(simple(
        &|c| matches!(c, Case::History { .. }),
        "history replay",
        "≥ 10× faster",
        "replay_s",
        "s",
        &|kw, etcd| kw * 10.0 <= etcd,
    ));
    out.push(simple(
        &|c| matches!(c, Case::Register { .. }),
        "registrations",
        "≥ 4× etcd's per second",
        "registrations_per_s",
        "/s",
        &|kw, etcd| kw >= 4.0 * etcd,
    ));
    let mut rss = simple(
        &|c| matches!(c, Case::Register { .. }),
        "server RSS per watcher",
        "≤ 1/4 of etcd's and ≤ 300 B",
        "rss_per_watcher_b",
        "B",
        &|kw, etcd| kw * 4.0 <= etcd && kw <= 300.0,
    );
    if rss.met.is_none()
        && let Some(kw) = pair(&|c| matches!(c, Case::Register { .. }))
            .0
            .and_then(|r| r.metric("rss_per_watcher_b"))
        && kw > 300.0
    {
        rss.met = Some(false);
    }
    out.push(rss);
    // Issue 14's large-dataset targets.
    let large = |c: &Case| matches!(c, Case::Large { .. });
    out.push(simple(
        &large,
        "large: restart to serving",
        "≤ etcd's",
        "restart_s",
        "s",
        &|kw, etcd| kw <= etcd,
    ));
    out.push(simple(
        &large,
        "large: server RSS",
        "≤ etcd's",
        "rss_mib",
        "MiB",
        &|kw, etcd| kw <= etcd,
    ));
    let mut range = simple(
        &large,
        "large: one-key Range at an old revision, p99",
        "≤ 10 ms",
        "history_range_p99_ms",
        "ms",
        &|kw, _| kw <= 10.0,
    );
    if range.met.is_none() {
        range.met = pair(&large)
            .0
            .and_then(|r| r.metric("history_range_p99_ms"))
            .map(|kw| kw <= 10.0);
    }
    out.push(range);
    let (kw, etcd) = pair(&large);
    let ratio = |r: Option<&RunResult>| {
        let r = r?;
        let during = r.metric("put_p99_compaction_ms")?;
        let steady = r.metric("put_p99_steady_ms")?;
        (steady > 0.0).then(|| during / steady)
    };
    let show = |r| ratio(r).map_or("—".into(), |v| format!("{}×", fmt(v)));
    out.push(TargetRow {
        what: "large: put p99 during a compaction / steady".into(),
        target: "≤ 2×".into(),
        keywatch: show(kw),
        etcd: show(etcd),
        met: ratio(kw).map(|v| v <= 2.0),
    });
    out
}

fn met(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "not measured",
    }
}

/// The markdown section, markers included. `charts` are `(title, relative link)` pairs.
pub fn markdown(report: &Report, charts: &[(String, String)], json: &str) -> String {
    let m = &report.meta;
    let mut s = String::new();
    s.push_str(BEGIN);
    s.push_str("\n## End to end: keywatch vs etcd (loadgen)\n\n");
    s.push_str(
        "Generated by `crates/loadgen` (`cargo xtask bench`); everything between the `loadgen` \
         markers is rewritten by each run. Both servers run the same scenarios with the same \
         client (watch-proto's tonic clients) on loopback, each case on a freshly started \
         server with a temporary data dir and default flags (both fsync every commit), \
         alternating which server goes first. The client shares the machine's cores with the \
         server, so absolute figures are a floor; compare the ratios.\n\n",
    );
    s.push_str(&format!(
        "- Machine: {} — a shared 2-vCPU VM; another engineer's builds may have been running \
         (load average {} before, {} after).\n- Date: {}. Commit: `{}`.\n- etcd: {}.\n\
         - Command: `{}`.\n- Raw data: [{json}](bench/{json}).\n\n",
        m.machine, m.load_before, m.load_after, m.date, m.commit, m.etcd, m.command
    ));
    let probe = |p: &Option<crate::fsync::FsyncProbe>| {
        p.as_ref().map_or("failed".into(), |p| {
            format!("p50 {} ms, p99 {} ms", fmt(p.p50_ms), fmt(p.p99_ms))
        })
    };
    s.push_str(&format!(
        "- The disk's fsync floor (`loadgen::fsync`: 4 KiB overwrite + `fdatasync` in the temp \
         dir, {} samples): {} before the runs, {} after.\n\n",
        FSYNC_SAMPLES,
        probe(&m.fsync_before),
        probe(&m.fsync_after)
    ));
    s.push_str(&format!(
        "Each figure is the median of {} run(s) per server and case, the servers alternating.\n\n",
        report.sizes.repeat.max(1)
    ));
    if m.quick {
        s.push_str("**Quick mode**: tiny sizes, figures are not meaningful.\n\n");
    }
    s.push_str("### Targets\n\n| what | target | keywatch | etcd | met |\n|---|---|---|---|---|\n");
    for t in &report.targets {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            t.what,
            t.target,
            t.keywatch,
            t.etcd,
            met(t.met)
        ));
    }
    s.push_str(
        "\nReading the figures: the load generator decodes every delivered event on the same \
         cores as the server, so at high fan-out the client's per-response cost is part of \
         what is measured; \"events per watch response\" shows how much each server batches \
         (etcd coalesces revisions for a watcher that is behind, which costs the client less \
         per event). RSS per watcher is the server's resident-set growth over the \
         registrations divided by their number, allocator slack included.\n",
    );
    s.push_str(
        "\n### All measurements\n\n\"advantage\" is how many times better keywatch is \
         (higher throughput or lower time, latency, memory); below 1 etcd is better. \
         \"correct\" covers both servers' runs of the case.\n\n\
         | scenario | case | metric | keywatch | etcd | advantage | correct |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let mut seen: Vec<&Case> = Vec::new();
    for r in &report.runs {
        if seen.contains(&&r.case) {
            continue;
        }
        seen.push(&r.case);
        let (kw, etcd) = report.pair(&r.case);
        let correct = [kw, etcd]
            .iter()
            .flatten()
            .map(|r| {
                if r.verdict.ok() {
                    format!("{}: ok ({} events)", r.target, r.verdict.received)
                } else {
                    format!("{}: {}", r.target, r.verdict.summary())
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        for (i, (label, get, better)) in rows(&r.case).into_iter().enumerate() {
            let k = kw.and_then(get);
            let e = etcd.and_then(get);
            let adv = match (k, e) {
                (Some(k), Some(e)) => {
                    advantage(k, e, better).map_or("—".into(), |a| format!("{}×", fmt(a)))
                }
                _ => "—".into(),
            };
            let (sc, case, corr) = if i == 0 {
                (
                    r.case.scenario().to_owned(),
                    r.case.to_string(),
                    correct.clone(),
                )
            } else {
                (String::new(), String::new(), String::new())
            };
            s.push_str(&format!(
                "| {sc} | {case} | {label} | {} | {} | {adv} | {corr} |\n",
                k.map_or("—".into(), fmt),
                e.map_or("—".into(), fmt),
            ));
        }
    }
    if !charts.is_empty() {
        s.push_str("\n### Charts\n\n");
        for (title, link) in charts {
            s.push_str(&format!("![{title}]({link})\n\n"));
        }
    }
    s.push_str(END);
    s.push('\n');
    s
}

/// Replaces the section between the markers in `doc` (appends it when absent).
pub fn splice(doc: &str, section: &str) -> String {
    splice_between(doc, BEGIN, END, section)
}

/// Replaces the text from `begin` through `end` (and the newline after it) in `doc` with
/// `section`, which carries the markers itself; appends `section` when the markers are absent.
pub fn splice_between(doc: &str, begin: &str, end: &str, section: &str) -> String {
    match (doc.find(begin), doc.find(end)) {
        (Some(b), Some(e)) if b < e => {
            let mut tail = &doc[e + end.len()..];
            tail = tail.strip_prefix('\n').unwrap_or(tail);
            format!("{}{section}{tail}", &doc[..b])
        }
        _ => {
            let sep = if doc.ends_with("\n\n") || doc.is_empty() {
                ""
            } else if doc.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{doc}{sep}{section}")
        }
    }
}

/// A labelled latency curve of one server: `(label, server, (nines, ms) points)`.
type Curve = (String, Target, Vec<(f64, f64)>);

const COLOURS: [RGBColor; 2] = [RGBColor(0, 114, 178), RGBColor(213, 94, 0)];

fn colour(t: Target) -> RGBColor {
    match t {
        Target::Keywatch => COLOURS[0],
        Target::Etcd => COLOURS[1],
    }
}

fn chart_err(e: impl std::fmt::Display) -> Error {
    Error::Chart(e.to_string())
}

/// Draws the charts into `dir`; returns `(title, file name)` of each drawn.
pub fn charts(report: &Report, dir: &Path) -> Result<Vec<(String, String)>, Error> {
    let mut out = Vec::new();
    let unpaced: Vec<&RunResult> = report
        .runs
        .iter()
        .filter(|r| matches!(r.case, Case::Fanout { rate: None, .. }))
        .collect();
    let watchers = |r: &RunResult| match r.case {
        Case::Fanout { watchers, .. } => watchers as f64,
        _ => 0.0,
    };
    let series = |get: &dyn Fn(&RunResult) -> Option<f64>| {
        [Target::Keywatch, Target::Etcd]
            .into_iter()
            .map(|t| {
                let mut pts: Vec<(f64, f64)> = unpaced
                    .iter()
                    .filter(|r| r.target == t)
                    .filter_map(|r| get(r).map(|v| (watchers(r), v)))
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                (t, pts)
            })
            .filter(|(_, p)| !p.is_empty())
            .collect::<Vec<_>>()
    };
    let tput = series(&|r| r.metric("events_per_s"));
    if !tput.is_empty() {
        let name = "fanout-throughput.svg";
        xy_chart(
            &dir.join(name),
            "fan-out: delivered events/s vs watchers (unpaced)",
            "watchers",
            "events/s",
            &tput,
        )?;
        out.push(("fan-out throughput vs watchers".into(), name.into()));
    }
    let p99 = series(&|r| r.event_latency.as_ref().map(|l| l.p99_ms));
    if !p99.is_empty() {
        let name = "fanout-p99.svg";
        xy_chart(
            &dir.join(name),
            "fan-out: put→event p99 ms vs watchers (unpaced)",
            "watchers",
            "p99 ms",
            &p99,
        )?;
        out.push(("fan-out p99 latency vs watchers".into(), name.into()));
    }
    // Latency distribution: every fan-out and stalled case with a latency, as percentile curves.
    let mut curves: Vec<Curve> = Vec::new();
    for r in &report.runs {
        let want = matches!(r.case, Case::Fanout { rate: Some(_), .. })
            || matches!(r.case, Case::Stalled { stalled, .. } if stalled > 0);
        if let (true, Some(l)) = (want, &r.event_latency) {
            let pts = l
                .curve
                .iter()
                .filter(|(q, _)| *q < 1.0)
                .map(|&(q, ms)| (-(1.0 - q).log10(), ms.max(0.001)))
                .collect();
            curves.push((
                format!("{} {} {}", r.target, r.case.scenario(), r.case),
                r.target,
                pts,
            ));
        }
    }
    if !curves.is_empty() {
        let name = "latency-distribution.svg";
        latency_chart(&dir.join(name), &curves)?;
        out.push(("put→event latency distribution".into(), name.into()));
    }
    Ok(out)
}

fn xy_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(Target, Vec<(f64, f64)>)],
) -> Result<(), Error> {
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let (x0, x1) = (x0.max(1.0) / 1.5, x1.max(1.0) * 1.5);
    let (y0, y1) = (y0.max(1e-3) / 2.0, y1.max(1e-3) * 2.0);
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
        .map_err(chart_err)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|v| fmt(*v))
        .y_label_formatter(&|v| fmt(*v))
        .draw()
        .map_err(chart_err)?;
    for (t, p) in series {
        let c = colour(*t);
        chart
            .draw_series(LineSeries::new(p.iter().copied(), c.stroke_width(2)))
            .map_err(chart_err)?
            .label(t.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(p.iter().map(|&pt| Circle::new(pt, 4, c.filled())))
            .map_err(chart_err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(chart_err)?;
    root.present().map_err(chart_err)
}

fn latency_chart(path: &Path, curves: &[Curve]) -> Result<(), Error> {
    let x1 = curves
        .iter()
        .flat_map(|c| c.2.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let ys = curves.iter().flat_map(|c| c.2.iter().map(|p| p.1));
    let (y0, y1) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("put→event latency by percentile", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x1 + 0.1, ((y0 / 2.0).max(1e-3)..y1 * 2.0).log_scale())
        .map_err(chart_err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ms")
        .x_label_formatter(&|v| {
            let p = 100.0 * (1.0 - 10f64.powf(-*v));
            format!("p{}", fmt(p))
        })
        .y_label_formatter(&|v| fmt(*v))
        .draw()
        .map_err(chart_err)?;
    for (i, (label, t, pts)) in curves.iter().enumerate() {
        let base = colour(*t);
        // Distinguish cases of one server by shade.
        let k = (i / 2) as f64 * 0.25;
        let c = base.mix(1.0 - k.min(0.6));
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(chart_err)?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(chart_err)?;
    root.present().map_err(chart_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_the_marked_region() {
        let doc = format!("# t\n\nbefore\n{BEGIN}\nold\n{END}\nafter\n");
        let out = splice(&doc, &format!("{BEGIN}\nnew\n{END}\n"));
        assert_eq!(out, format!("# t\n\nbefore\n{BEGIN}\nnew\n{END}\nafter\n"));
        let appended = splice("# t\n", &format!("{BEGIN}\nx\n{END}\n"));
        assert_eq!(appended, format!("# t\n\n{BEGIN}\nx\n{END}\n"));
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(today().len(), 10);
    }
}
