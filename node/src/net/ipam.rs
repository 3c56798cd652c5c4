//! Per-instance address allocation from the node's IPv6 prefix and IPv4
//! range, kept in a JSON file so that a restarted daemon keeps them.
//!
//! Allocation is deterministic: an instance gets the lowest free address of
//! each family. The first two addresses of the IPv6 prefix (`::0`, `::1`,
//! the latter for the node itself) are never handed out; nor are the IPv4
//! network address, the first host address (`.1`, the node) and the
//! broadcast address.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use super::NetError;

/// The allocations file's format version.
const VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    version: u32,
    /// Instance id → its addresses.
    instances: BTreeMap<String, Allocation>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Allocation {
    v6: Ipv6Addr,
    v4: Ipv4Addr,
}

/// The node's address allocations (see the module documentation).
#[derive(Debug)]
pub struct Ipam {
    path: PathBuf,
    prefix_v6: Ipv6Net,
    range_v4: Ipv4Net,
    state: State,
}

impl Ipam {
    /// Loads the allocations in `path` (none if the file does not exist yet).
    ///
    /// Allocations outside `prefix_v6`/`range_v4` (after the node was given
    /// another prefix) are kept until their instance is allocated again,
    /// which moves it into the new range, or released.
    pub fn load(path: &Path, prefix_v6: Ipv6Net, range_v4: Ipv4Net) -> Result<Ipam, NetError> {
        let (prefix_v6, range_v4) = (prefix_v6.trunc(), range_v4.trunc());
        if prefix_v6.prefix_len() > 126 {
            return Err(NetError::Config(format!(
                "the instance IPv6 prefix {prefix_v6} has no addresses for instances: it needs to be /126 or larger (a /64 normally)"
            )));
        }
        if range_v4.prefix_len() > 30 {
            return Err(NetError::Config(format!(
                "the instance IPv4 range {range_v4} has no addresses for instances: it needs to be /30 or larger (10.89.0.0/16 by default)"
            )));
        }
        let state = match fs::read(path) {
            Ok(bytes) => {
                let state: State =
                    serde_json::from_slice(&bytes).map_err(|source| NetError::IpamCorrupt {
                        path: path.to_owned(),
                        source,
                    })?;
                if state.version != VERSION {
                    return Err(NetError::IpamIo {
                        action: "read",
                        path: path.to_owned(),
                        source: io::Error::other(format!(
                            "it has format version {}, this verge understands version {VERSION}",
                            state.version
                        )),
                    });
                }
                state
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => State {
                version: VERSION,
                instances: BTreeMap::new(),
            },
            Err(source) => {
                return Err(NetError::IpamIo {
                    action: "read",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Ok(Ipam {
            path: path.to_owned(),
            prefix_v6,
            range_v4,
            state,
        })
    }

    /// The addresses of `instance`: those it already has, or the lowest
    /// free ones, saved to the file before this returns.
    pub fn allocate(&mut self, instance: &str) -> Result<(Ipv6Addr, Ipv4Addr), NetError> {
        let existing = self.state.instances.get(instance).copied();
        let v6 = match existing {
            Some(a) if self.prefix_v6.contains(&a.v6) => a.v6,
            _ => self.free_v6(instance)?,
        };
        let v4 = match existing {
            Some(a) if self.range_v4.contains(&a.v4) => a.v4,
            _ => self.free_v4(instance)?,
        };
        let allocation = Allocation { v6, v4 };
        if existing != Some(allocation) {
            self.state.instances.insert(instance.to_owned(), allocation);
            if let Err(e) = self.save() {
                match existing {
                    Some(old) => self.state.instances.insert(instance.to_owned(), old),
                    None => self.state.instances.remove(instance),
                };
                return Err(e);
            }
        }
        Ok((v6, v4))
    }

    /// Frees the addresses of `instance`; releasing an unknown instance is Ok.
    pub fn release(&mut self, instance: &str) -> Result<(), NetError> {
        if let Some(old) = self.state.instances.remove(instance)
            && let Err(e) = self.save()
        {
            self.state.instances.insert(instance.to_owned(), old);
            return Err(e);
        }
        Ok(())
    }

    /// The addresses of `instance`, if it has some.
    pub fn get(&self, instance: &str) -> Option<(Ipv6Addr, Ipv4Addr)> {
        self.state.instances.get(instance).map(|a| (a.v6, a.v4))
    }

    /// The instances holding addresses, in order.
    pub fn instances(&self) -> impl Iterator<Item = &str> {
        self.state.instances.keys().map(String::as_str)
    }

    fn free_v6(&self, instance: &str) -> Result<Ipv6Addr, NetError> {
        let net = u128::from(self.prefix_v6.network());
        let last = u128::from(self.prefix_v6.broadcast());
        let used: BTreeSet<u128> = self
            .state
            .instances
            .values()
            .map(|a| u128::from(a.v6))
            .collect();
        lowest_free(&used, net + 2, last)
            .map(Ipv6Addr::from)
            .ok_or_else(|| self.exhausted(instance, "IPv6", self.prefix_v6.to_string()))
    }

    fn free_v4(&self, instance: &str) -> Result<Ipv4Addr, NetError> {
        let net = u32::from(self.range_v4.network());
        let broadcast = u32::from(self.range_v4.broadcast());
        let used: BTreeSet<u128> = self
            .state
            .instances
            .values()
            .map(|a| u128::from(u32::from(a.v4)))
            .collect();
        lowest_free(&used, u128::from(net) + 2, u128::from(broadcast) - 1)
            .map(|a| Ipv4Addr::from(a as u32))
            .ok_or_else(|| self.exhausted(instance, "IPv4", self.range_v4.to_string()))
    }

    fn exhausted(&self, instance: &str, family: &'static str, range: String) -> NetError {
        NetError::Exhausted {
            instance: instance.to_owned(),
            family,
            range,
            used: self.state.instances.len(),
        }
    }

    /// Writes the file atomically: a temporary file beside it, synced, then
    /// renamed over it, then the directory synced.
    fn save(&self) -> Result<(), NetError> {
        let err = |source| NetError::IpamIo {
            action: "write",
            path: self.path.clone(),
            source,
        };
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(err)?;
        let mut tmp_name = self.path.file_name().unwrap_or_default().to_owned();
        tmp_name.push(".tmp");
        let tmp = dir.join(tmp_name);
        let json = serde_json::to_vec_pretty(&self.state).map_err(|e| err(e.into()))?;
        let mut file = File::create(&tmp).map_err(err)?;
        file.write_all(&json)
            .and_then(|()| file.sync_all())
            .map_err(err)?;
        drop(file);
        fs::rename(&tmp, &self.path).map_err(err)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(err)
    }
}

/// The lowest value in `first..=last` not in `used`.
fn lowest_free(used: &BTreeSet<u128>, first: u128, last: u128) -> Option<u128> {
    let mut candidate = first;
    for &taken in used.range(first..) {
        if taken != candidate {
            break;
        }
        candidate = candidate.checked_add(1)?;
    }
    (candidate <= last).then_some(candidate)
}
