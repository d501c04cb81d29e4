//! How many CPUs this process may really use, for `instances = "max"`.
//!
//! The host's core count is the wrong answer in a container or under `taskset`: PM2 uses it and
//! starts more Node processes than the CPU quota can run, which only adds context switches. We
//! take the smallest of the scheduler affinity mask and the cgroup CPU quota (v2 `cpu.max`, or
//! v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`), walking up the cgroup tree because a parent's
//! quota binds its children too.

use std::path::{Path, PathBuf};

/// CPUs usable by this process: affinity mask and cgroup quota, never less than 1.
pub fn usable_cpus() -> usize {
    let affinity = affinity_cpus();
    let quota = cgroup_quota_cpus(Path::new("/proc/self/cgroup"), Path::new("/sys/fs/cgroup"));
    [affinity, quota]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1)
}

fn affinity_cpus() -> Option<usize> {
    use nix::sched::{sched_getaffinity, CpuSet};
    use nix::unistd::Pid;
    let set = sched_getaffinity(Pid::from_raw(0)).ok()?;
    let count = (0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .count();
    (count > 0).then_some(count)
}

/// The tightest CPU quota of this process's cgroup and its ancestors, rounded up.
fn cgroup_quota_cpus(proc_cgroup: &Path, cgroup_root: &Path) -> Option<usize> {
    let membership = std::fs::read_to_string(proc_cgroup).ok()?;
    let mut best: Option<f64> = None;
    let mut consider = |cpus: Option<f64>| {
        if let Some(cpus) = cpus {
            best = Some(best.map_or(cpus, |b: f64| b.min(cpus)));
        }
    };
    for line in membership.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        if id == "0" && controllers.is_empty() {
            // cgroup v2: one unified tree.
            for dir in ancestors(&cgroup_root.join(relative), cgroup_root) {
                consider(read(&dir.join("cpu.max")).and_then(|s| parse_cpu_max(&s)));
            }
        } else if controllers.split(',').any(|c| c == "cpu") {
            // cgroup v1: the cpu controller's own hierarchy.
            for mount in ["cpu", "cpu,cpuacct", "cpuacct,cpu"] {
                let root = cgroup_root.join(mount);
                for dir in ancestors(&root.join(relative), &root) {
                    let quota = read(&dir.join("cpu.cfs_quota_us"));
                    let period = read(&dir.join("cpu.cfs_period_us"));
                    if let (Some(q), Some(p)) = (quota, period) {
                        consider(parse_cfs(&q, &p));
                    }
                }
            }
        }
    }
    best.map(|cpus| (cpus.ceil() as usize).max(1))
}

fn ancestors(start: &Path, root: &Path) -> Vec<PathBuf> {
    start
        .ancestors()
        .take_while(|dir| dir.starts_with(root))
        .map(Path::to_path_buf)
        .collect()
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// `cpu.max` is `"<quota> <period>"` or `"max <period>"` (no limit).
fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut fields = text.split_whitespace();
    let quota: f64 = fields.next()?.parse().ok()?;
    let period: f64 = fields.next()?.parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// cgroup v1: a quota of -1 means no limit.
fn parse_cfs(quota: &str, period: &str) -> Option<f64> {
    let quota: f64 = quota.trim().parse().ok()?;
    let period: f64 = period.trim().parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_formats() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2.0));
        assert_eq!(parse_cpu_max("150000 100000"), Some(1.5));
        assert_eq!(parse_cpu_max("garbage"), None);
        assert_eq!(parse_cfs("-1", "100000"), None);
        assert_eq!(parse_cfs("50000\n", "100000\n"), Some(0.5));
    }

    #[test]
    fn v2_quota_is_the_tightest_ancestor() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("fs");
        let leaf = root.join("system.slice/app.service");
        std::fs::create_dir_all(&leaf)?;
        std::fs::write(root.join("system.slice/cpu.max"), "150000 100000\n")?;
        std::fs::write(leaf.join("cpu.max"), "max 100000\n")?;
        let membership = dir.path().join("cgroup");
        std::fs::write(&membership, "0::/system.slice/app.service\n")?;
        assert_eq!(cgroup_quota_cpus(&membership, &root), Some(2));
        std::fs::write(leaf.join("cpu.max"), "50000 100000\n")?;
        assert_eq!(cgroup_quota_cpus(&membership, &root), Some(1));
        Ok(())
    }

    #[test]
    fn no_quota_means_affinity_decides() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let membership = dir.path().join("cgroup");
        std::fs::write(&membership, "0::/\n")?;
        assert_eq!(cgroup_quota_cpus(&membership, dir.path()), None);
        assert!(usable_cpus() >= 1);
        Ok(())
    }
}
