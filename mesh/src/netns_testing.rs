//! Support for tests that need real multicast: each runs again, as a child process,
//! inside a network namespace of its own, where a veth pair joins `hm0` and `hm1`. A node
//! on `hm0` hears a node on `hm1` only through the pair, so the multicast is real, and none
//! of it can leave the namespace. Used by the discovery unit tests and `tests/mdns.rs`; not
//! part of the crate's API.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

/// Set in the child that runs a test inside its private network namespace.
const IN_NETNS: &str = "HEARTH_MDNS_TEST_NETNS";

/// Run by `sh` inside the new namespace, before it execs the test binary (`$0`, its
/// arguments `$@`): a veth pair `hm0` <-> `hm1` with an IPv4 address at each end.
///
/// Multicast sent on `hm0` comes in on `hm1` and the other way round, but with a
/// source address that is local to the namespace, which Linux drops as martian
/// unless `accept_local` is on. No DAD, so the IPv6 link-local addresses work at
/// once instead of two seconds in. All of it is undone when the namespace goes.
const NETNS_SETUP: &str = r#"set -e
ip link set lo up
if [ -w /proc/sys/net/ipv6/conf/default/accept_dad ]; then
    echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad
fi
ip link add hm0 type veth peer name hm1
for conf in all hm0 hm1; do
    echo 1 > /proc/sys/net/ipv4/conf/$conf/accept_local
done
ip addr add 10.250.0.1/24 dev hm0
ip addr add 10.250.0.2/24 dev hm1
ip link set hm0 up
ip link set hm1 up
exec "$0" "$@""#;

/// Whether the calling test should go ahead: true in the child that already runs
/// inside a private network namespace. Otherwise this runs the test `name` (its full
/// libtest name) again in such a child, forwards its output, fails if it failed, and
/// returns false.
///
/// Creating the namespace takes root (or, failing that, a user namespace that maps
/// us to root). Without either the test is skipped loudly; but under `CI=true` as
/// root, where it must run, not being able to create the namespace is a failure.
pub fn in_private_netns(name: &str) -> bool {
    if std::env::var_os(IN_NETNS).is_some() {
        return true;
    }
    let root = std::fs::metadata("/proc/self").is_ok_and(|proc| proc.uid() == 0);
    let ci = std::env::var("CI").is_ok_and(|ci| ci == "true" || ci == "1");
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut unshare = Command::new("unshare");
    if !root {
        unshare.args(["--user", "--map-root-user"]);
    }
    unshare
        .args(["--net", "--", "sh", "-c", NETNS_SETUP])
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env(IN_NETNS, "1");
    let why = match unshare.output() {
        Err(e) => format!("cannot run unshare: {e}"),
        // libtest exits with 0 or 101; anything else is unshare or the setup failing.
        Ok(out) if matches!(out.status.code(), Some(0 | 101) | None) => {
            let stdout = String::from_utf8_lossy(&out.stdout);
            eprint!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
            assert!(
                out.status.success(),
                "{name} failed in its network namespace: {}",
                out.status
            );
            assert!(
                stdout.contains("test result: ok. 1 passed"),
                "{name} did not run in its network namespace"
            );
            return false;
        }
        Ok(out) => format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    };
    assert!(
        !(ci && root),
        "CI=true and root, yet no private network namespace for {name}: {why}"
    );
    // Straight to stderr, past the test harness's capture, so the skip shows.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED: mDNS tests need root to create a private network namespace ***\n    ({name}: {why})\n"
    );
    false
}
