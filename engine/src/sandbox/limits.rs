//! The process limit of a `run` step: a cgroup of the pids controller per step.
//!
//! `RLIMIT_NPROC` cannot do this job: it counts every process of the step's real user across
//! the host, and the kernel does not apply it to root at all. A pids cgroup counts only the
//! step's processes, whoever runs them. cgroup v2 is used when its pids controller is
//! available to graphbuild's cgroup; otherwise the cgroup v1 pids hierarchy (hybrid hosts).
//! Without either, the supervisor counts the step's processes in its `/proc` every 100ms
//! instead (an approximate limit: a fork bomb overshoots before it is killed), and a notice
//! says so.
//!
//! The supervisor creates `graphbuild-sandbox-PID` next to its own cgroup, moves PID 1 into it
//! before PID 1 starts anything (so every process of the step is counted), watches
//! `pids.events` to kill the step when it hits the limit, and removes the cgroup
//! when PID 1 is gone (and with it the whole pid namespace). Cgroups left by a supervisor
//! that was killed are removed by the next one.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PREFIX: &str = "graphbuild-sandbox-";

/// Which cgroup hierarchy enforces the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The directory the step's cgroups are created in.
    pub parent: PathBuf,
    /// `cgroup v2` or `cgroup v1`.
    pub version: &'static str,
}

/// Why no step cgroup can be had; the supervisor then counts processes itself.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: &'static str,
        source: std::io::Error,
    },
    /// Neither hierarchy can hold step cgroups: why not, for each.
    #[error("{v2}; {v1}")]
    Unavailable { v2: Unusable, v1: Unusable },
    #[error("cannot create {}: {source}", dir.display())]
    Create {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set {}/pids.max: {source}", dir.display())]
    SetMax {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Why one cgroup hierarchy cannot hold step cgroups.
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    #[error("not in a cgroup v2 hierarchy")]
    NotInV2,
    #[error("no cgroup v2 mount")]
    NoV2Mount,
    #[error("the cgroup v2 pids controller is not available in {}", .0.display())]
    NoV2Controller(PathBuf),
    #[error("cannot enable the cgroup v2 pids controller for {}'s children: {source}", dir.display())]
    EnableV2 {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup v1 pids hierarchy")]
    NoV1Hierarchy,
    #[error("the cgroup v1 pids hierarchy is not mounted")]
    V1NotMounted,
    #[error("{} does not exist", .0.display())]
    Missing(PathBuf),
}

/// Finds where step cgroups can be made, or says why not.
pub fn locate() -> Result<Location, CgroupError> {
    let read = |path: &'static str| {
        fs::read_to_string(path).map_err(|source| CgroupError::Read { path, source })
    };
    let own = read("/proc/self/cgroup")?;
    let mountinfo = read("/proc/self/mountinfo")?;
    let v2 = match locate_v2(&own, &mountinfo) {
        Ok(location) => return Ok(location),
        Err(reason) => reason,
    };
    let v1 = match locate_v1(&own, &mountinfo) {
        Ok(location) => return Ok(location),
        Err(reason) => reason,
    };
    Err(CgroupError::Unavailable { v2, v1 })
}

/// (mount point, root inside the hierarchy, filesystem type, super options) per cgroup mount.
fn cgroup_mounts(mountinfo: &str) -> Vec<(PathBuf, String, String, String)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let after: Vec<&str> = after.split(' ').collect();
            let fstype = *after.first()?;
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            Some((
                PathBuf::from(unescape(fields.get(4)?)),
                unescape(fields.get(3)?),
                fstype.to_string(),
                after.get(2).copied().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

/// mountinfo escapes spaces and the like as `\040`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\'
            && index + 3 < bytes.len()
            && let Ok(value) = u8::from_str_radix(&field[index + 1..index + 4], 8)
        {
            out.push(value);
            index += 4;
            continue;
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `mount point / (own path relative to the mount's root)`.
fn join_inside(mount_point: &Path, mount_root: &str, own: &str) -> PathBuf {
    let relative = own
        .strip_prefix(mount_root)
        .unwrap_or(own)
        .trim_start_matches('/');
    mount_point.join(relative)
}

fn locate_v2(own: &str, mountinfo: &str) -> Result<Location, Unusable> {
    let path = own
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or(Unusable::NotInV2)?;
    let (mount_point, root, _, _) = cgroup_mounts(mountinfo)
        .into_iter()
        .find(|(_, _, fstype, _)| fstype == "cgroup2")
        .ok_or(Unusable::NoV2Mount)?;
    let own_dir = join_inside(&mount_point, &root, path);
    let has = |file: &str, dir: &Path| {
        fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .split_whitespace()
            .any(|name| name == "pids")
    };
    let location = |parent: PathBuf| Location {
        parent,
        version: "cgroup v2",
    };
    // Children of graphbuild's own cgroup get the controller.
    if has("cgroup.subtree_control", &own_dir) {
        return Ok(location(own_dir));
    }
    // Graphbuild's cgroup is limited itself (its parent enables pids, which a cgroup holding
    // processes cannot do for its children): make the step's cgroup a sibling.
    if own_dir.join("pids.max").exists()
        && let Some(parent) = own_dir.parent()
        && has("cgroup.subtree_control", parent)
        && fs::metadata(parent.join("cgroup.procs")).is_ok()
    {
        return Ok(location(parent.to_path_buf()));
    }
    if !has("cgroup.controllers", &own_dir) {
        return Err(Unusable::NoV2Controller(own_dir));
    }
    // Works where the cgroup holds no process itself (the root cgroup, a delegated subtree).
    if let Err(source) = fs::write(own_dir.join("cgroup.subtree_control"), "+pids") {
        return Err(Unusable::EnableV2 {
            dir: own_dir,
            source,
        });
    }
    Ok(location(own_dir))
}

fn locate_v1(own: &str, mountinfo: &str) -> Result<Location, Unusable> {
    let path = own
        .lines()
        .find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let _id = fields.next()?;
            let controllers = fields.next()?;
            let path = fields.next()?;
            controllers
                .split(',')
                .any(|name| name == "pids")
                .then_some(path)
        })
        .ok_or(Unusable::NoV1Hierarchy)?;
    let (mount_point, root, _, _) = cgroup_mounts(mountinfo)
        .into_iter()
        .find(|(_, _, fstype, options)| {
            fstype == "cgroup" && options.split(',').any(|option| option == "pids")
        })
        .ok_or(Unusable::V1NotMounted)?;
    let parent = join_inside(&mount_point, &root, path);
    if !parent.is_dir() {
        return Err(Unusable::Missing(parent));
    }
    Ok(Location {
        parent,
        version: "cgroup v1",
    })
}

/// One step's cgroup; removed on drop.
pub struct StepCgroup {
    dir: PathBuf,
    pub max: u32,
}

impl StepCgroup {
    /// Creates this supervisor's cgroup limited to `max` processes, first removing those
    /// of supervisors that are gone.
    pub fn create(location: &Location, max: u32) -> Result<StepCgroup, CgroupError> {
        sweep_stale(&location.parent);
        let dir = location
            .parent
            .join(format!("{PREFIX}{}", std::process::id()));
        if let Err(source) = fs::create_dir(&dir)
            && source.kind() != std::io::ErrorKind::AlreadyExists
        {
            return Err(CgroupError::Create { dir, source });
        }
        let cgroup = StepCgroup { dir, max };
        if let Err(source) = fs::write(cgroup.dir.join("pids.max"), max.to_string()) {
            return Err(CgroupError::SetMax {
                dir: cgroup.dir.clone(),
                source,
            });
        }
        Ok(cgroup)
    }

    /// Moves process `pid` into the cgroup.
    pub fn add(&self, pid: i32) -> std::io::Result<()> {
        fs::write(self.dir.join("cgroup.procs"), pid.to_string())
    }

    /// Kills every process of the cgroup at once where the kernel can (`cgroup.kill`, cgroup
    /// v2 since Linux 5.14). Killing PID 1 ends the pid namespace anyway; this is quicker
    /// with a fork bomb running.
    pub fn kill_all(&self) {
        let kill = self.dir.join("cgroup.kill");
        if kill.exists() {
            let _ = fs::write(kill, "1");
        }
    }

    /// Whether a fork was refused because of the limit.
    pub fn limit_reached(&self) -> bool {
        fs::read_to_string(self.dir.join("pids.events"))
            .ok()
            .and_then(|events| {
                events.lines().find_map(|line| {
                    let count = line.strip_prefix("max ")?;
                    count.trim().parse::<u64>().ok()
                })
            })
            .is_some_and(|count| count > 0)
    }
}

impl Drop for StepCgroup {
    fn drop(&mut self) {
        // The last processes may take a moment to leave the cgroup after PID 1 was reaped.
        let deadline = Instant::now() + Duration::from_secs(2);
        while fs::remove_dir(&self.dir).is_err() && self.dir.exists() {
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Removes (empty) step cgroups whose supervisor process no longer exists.
fn sweep_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(PREFIX))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = fs::remove_dir(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mountinfo(lines: &[(&Path, &str, &str)]) -> String {
        lines
            .iter()
            .enumerate()
            .map(|(index, (point, fstype, options))| {
                format!(
                    "{index} 1 0:{index} / {} rw,relatime shared:1 - {fstype} {fstype} {options}\n",
                    point.display()
                )
            })
            .collect()
    }

    #[test]
    fn the_v1_pids_hierarchy_serves_hybrid_hosts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (unified, pids) = (dir.path().join("unified"), dir.path().join("pids"));
        fs::create_dir_all(pids.join("user.slice")).expect("mkdir");
        fs::create_dir_all(&unified).expect("mkdir");
        // The v2 hierarchy has no controller: pids is bound to v1.
        fs::write(unified.join("cgroup.controllers"), "").expect("write");
        let info = mountinfo(&[(&unified, "cgroup2", "rw"), (&pids, "cgroup", "rw,pids")]);
        let own = "8:pids:/user.slice\n1:name=systemd:/user.slice\n0::/user.slice\n";
        let reason = locate_v2(own, &info).expect_err("no v2 pids");
        assert!(
            matches!(&reason, Unusable::NoV2Controller(dir) if *dir == unified.join("user.slice")),
            "{reason}"
        );
        assert!(reason.to_string().contains("not available"), "{reason}");
        assert_eq!(
            locate_v1(own, &info).ok(),
            Some(Location {
                parent: pids.join("user.slice"),
                version: "cgroup v1",
            })
        );
    }

    #[test]
    fn cgroup_v2_uses_the_own_cgroup_or_a_sibling() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("cgroup");
        let own_dir = root.join("build.slice/graphbuild.scope");
        fs::create_dir_all(&own_dir).expect("mkdir");
        let info = mountinfo(&[(&root, "cgroup2", "rw")]);
        let own = "0::/build.slice/graphbuild.scope\n";
        // graphbuild's cgroup is limited by its parent: steps go next to it.
        fs::write(root.join("build.slice/cgroup.subtree_control"), "cpu pids").expect("write");
        fs::write(root.join("build.slice/cgroup.procs"), "").expect("write");
        fs::write(own_dir.join("pids.max"), "max").expect("write");
        fs::write(own_dir.join("cgroup.controllers"), "cpu pids").expect("write");
        assert_eq!(
            locate_v2(own, &info).ok().map(|location| location.parent),
            Some(root.join("build.slice"))
        );
        // Delegated to graphbuild: its children get the controller.
        fs::write(own_dir.join("cgroup.subtree_control"), "pids").expect("write");
        assert_eq!(
            locate_v2(own, &info).ok().map(|location| location.parent),
            Some(own_dir.clone())
        );
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }
}
