//! Which images and content GC removes: a pure plan over the store's state.
//!
//! Content no image references (left by a crashed or abandoned pull) always
//! goes. Then, while the store holds more than its budget, the image used
//! least recently goes, with the content no remaining image references.
//! Images in use, images being pulled and content pinned by a pull are
//! never touched, even if the budget cannot be met without them.

use std::collections::{HashMap, HashSet};

use super::store::{Content, State};

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Images to forget, least recently used first.
    pub images: Vec<String>,
    pub content: Vec<Content>,
    /// What the store will hold afterwards.
    pub usage: u64,
}

pub(crate) fn plan(state: &State, in_use: &HashSet<&str>, budget: u64) -> Plan {
    let mut refs: HashMap<Content, usize> = HashMap::new();
    for record in state.images.values() {
        for c in record.contents() {
            *refs.entry(c).or_default() += 1;
        }
    }
    let removable = |c: &Content| !state.pins.contains_key(c);
    let mut plan = Plan {
        usage: state.usage,
        ..Plan::default()
    };
    let mut orphans: Vec<(&Content, u64)> = state
        .content
        .iter()
        .filter(|(c, _)| !refs.contains_key(*c) && removable(c))
        .map(|(c, size)| (c, *size))
        .collect();
    orphans.sort();
    for (c, size) in orphans {
        plan.content.push(c.clone());
        plan.usage -= size;
    }

    let mut candidates: Vec<_> = state
        .images
        .values()
        .filter(|r| !in_use.contains(r.digest.as_str()) && !state.pulling.contains_key(&r.digest))
        .collect();
    candidates.sort_by(|a, b| (a.last_used, &a.digest).cmp(&(b.last_used, &b.digest)));
    for record in candidates {
        if plan.usage <= budget {
            break;
        }
        plan.images.push(record.digest.clone());
        for c in record.contents() {
            let Some(n) = refs.get_mut(&c) else { continue };
            *n -= 1;
            if *n > 0 || !removable(&c) {
                continue;
            }
            if let Some(size) = state.content.get(&c) {
                plan.usage -= size;
                plan.content.push(c);
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::super::store::{ImageRecord, Sized};
    use super::*;

    fn digest(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    fn image(state: &mut State, n: u8, layers: &[u8], last_used: u64) {
        let blob = Sized {
            digest: digest(n),
            size: 1,
        };
        let layers: Vec<Sized> = layers
            .iter()
            .map(|l| Sized {
                digest: digest(*l),
                size: 100,
            })
            .collect();
        state.content.insert(Content::Blob(digest(n)), 1);
        for l in &layers {
            state.content.insert(Content::Layer(l.digest.clone()), 100);
        }
        state.images.insert(
            digest(n),
            ImageRecord {
                digest: digest(n),
                reference: String::new(),
                manifest: digest(n),
                config: digest(n),
                blobs: vec![blob],
                layers,
                last_used,
                size: 0,
            },
        );
        state.usage = state.content.values().sum();
    }

    #[test]
    fn oldest_unused_first_until_under_budget_keeping_shared_layers() {
        let mut state = State::default();
        image(&mut state, 1, &[10, 11], 1); // oldest, shares 11 with 2
        image(&mut state, 2, &[11, 12], 2);
        image(&mut state, 3, &[13], 3);
        assert_eq!(state.usage, 403);
        let used = digest(3);
        let in_use = HashSet::from([used.as_str()]);
        let p = plan(&state, &in_use, 302);
        assert_eq!(p.images, vec![digest(1)]);
        assert_eq!(
            p.content,
            vec![Content::Blob(digest(1)), Content::Layer(digest(10))]
        );
        assert_eq!(p.usage, 302);
        // Under budget already: nothing goes.
        assert_eq!(plan(&state, &in_use, 1000).images, Vec::<String>::new());
        // Everything unused goes if need be; the image in use stays.
        let p = plan(&state, &in_use, 0);
        assert_eq!(p.images, vec![digest(1), digest(2)]);
        assert_eq!(p.usage, 101);
    }

    #[test]
    fn pinned_and_pulling_are_kept_orphans_go() {
        let mut state = State::default();
        image(&mut state, 1, &[10], 1);
        state.content.insert(Content::Layer(digest(20)), 50); // orphan
        state.content.insert(Content::Layer(digest(21)), 50); // pinned orphan
        state.usage += 100;
        state.pins.insert(Content::Layer(digest(21)), 1);
        state.pulling.insert(digest(1), 1);
        let p = plan(&state, &HashSet::new(), 0);
        assert_eq!(p.images, Vec::<String>::new());
        assert_eq!(p.content, vec![Content::Layer(digest(20))]);
    }
}
