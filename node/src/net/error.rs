//! What can go wrong in instance networking, with what to do about it.

use std::io;
use std::path::PathBuf;

/// An instance networking failure. Messages name the instance, interface,
/// address or file involved and, where the cause is common, what to do.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "invalid instance id {0:?}: an instance id is 1 to 128 letters, digits, '-', '_' or '.', and does not start with '.'"
    )]
    BadInstanceId(String),
    #[error("invalid network config: {0}")]
    Config(String),
    /// A step of setting up or removing one instance's network failed.
    #[error("{action} for instance {instance}: {source}{hint}", hint = hint(.source))]
    Instance {
        instance: String,
        action: String,
        #[source]
        source: io::Error,
    },
    /// A node-wide step failed (netns directory, netlink, sysctls).
    #[error("{action}: {source}{hint}", hint = hint(.source))]
    Node {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot {action} address allocations file {path}: {source}")]
    IpamIo {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "address allocations file {path} is not valid ({source}): move it away to start with no allocations (instances get new addresses when they are set up again)"
    )]
    IpamCorrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "no free {family} address left in {range} for instance {instance}: {used} instances hold all of them; remove instances that no longer run, or give the node a larger range"
    )]
    Exhausted {
        instance: String,
        family: &'static str,
        range: String,
        used: usize,
    },
}

impl NetError {
    pub(crate) fn instance(instance: &str, action: impl Into<String>, source: io::Error) -> Self {
        NetError::Instance {
            instance: instance.to_owned(),
            action: action.into(),
            source,
        }
    }

    pub(crate) fn node(action: impl Into<String>, source: io::Error) -> Self {
        NetError::Node {
            action: action.into(),
            source,
        }
    }

    /// The OS error code behind this error, if there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetError::Instance { source, .. }
            | NetError::Node { source, .. }
            | NetError::IpamIo { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// What to do about the common causes, as a suffix of the message.
fn hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => {
            ": verge node needs CAP_NET_ADMIN and CAP_SYS_ADMIN (run it as root), or run it with --isolation none"
        }
        Some(libc::EEXIST) => ": a leftover from an earlier run may hold that name",
        Some(libc::EOPNOTSUPP | libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT) => {
            ": the kernel lacks something instance networking needs (network namespaces, veth, IPv6); run with --isolation none on this machine"
        }
        _ => "",
    }
}

/// Converts an rtnetlink error into the `io::Error` it stands for, so that
/// messages read "Operation not permitted (os error 1)" and callers can
/// match on the error code.
pub(crate) fn netlink_io(err: rtnetlink::Error) -> io::Error {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_instance_and_say_what_to_do() {
        let err = NetError::instance(
            "inst-a",
            "creating veth vgab12",
            io::Error::from_raw_os_error(libc::EPERM),
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("creating veth vgab12 for instance inst-a: "),
            "{msg}"
        );
        assert!(
            msg.ends_with("CAP_SYS_ADMIN (run it as root), or run it with --isolation none"),
            "{msg}"
        );
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));

        let err = netlink_io(rtnetlink::Error::RequestFailed);
        assert_eq!(err.raw_os_error(), None);
        let msg = NetError::node("opening rtnetlink", err).to_string();
        assert_eq!(msg, "opening rtnetlink: A netlink request failed");
    }
}
