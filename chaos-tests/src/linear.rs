//! Linearizability of one register (one tag), checked by search in the manner of Wing & Gong
//! and Lowe (as Knossos and Porcupine do): find an order of the operations that respects real
//! time (an operation that completed before another was invoked comes first) and the register's
//! semantics (a read returns the last value written; absent before any write and after a
//! delete). Writes whose outcome is unknown may take effect at any point after their
//! invocation, or never. Visited (done-set, value) pairs are memoised.
//!
//! Why leaving out unread unknown writes is sound: such a write only changes the value to one
//! that no read returned, so removing it from a valid order leaves an order in which every
//! read still returns the last value written before it (reads that followed it saw a later
//! write anyway).

use std::collections::{HashMap, HashSet};

use rand::{Rng, SeedableRng};

use crate::workload::{Kind, Op, Outcome};

/// What the search concluded.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order exists; the longest order found explained `longest_prefix` operations.
    Violation {
        longest_prefix: usize,
    },
    /// The search gave up after `budget` states (not a violation, not a proof).
    Unknown,
}

struct Entry {
    invoke: u64,
    /// `u64::MAX` for operations of unknown outcome: they never bound others.
    complete: u64,
    required: bool,
    kind: Kind,
    value: u32,
}

/// Checks the operations of one key; `budget` bounds the states visited.
pub fn check(ops: &[&Op], budget: usize) -> Verdict {
    // A write of unknown outcome whose value nobody read can be left out: any order that
    // places it could drop it and stay valid. Keeping such writes would only multiply the
    // orders to search (each may or may not have happened).
    let read: HashSet<&str> = ops.iter().filter(|o| o.kind == Kind::Read).filter_map(|o| o.value.as_deref()).collect();
    let relevant = |o: &&&Op| {
        !(o.kind == Kind::Write && o.outcome == Outcome::Info && !read.contains(o.value.as_deref().unwrap_or("")))
    };
    // values as small integers; 0 = absent
    let mut ids: HashMap<&str, u32> = HashMap::new();
    let mut entries: Vec<Entry> = ops
        .iter()
        .filter(relevant)
        .map(|o| {
            let value = match &o.value {
                None => 0,
                Some(v) => {
                    let n = ids.len() as u32 + 1;
                    *ids.entry(v.as_str()).or_insert(n)
                }
            };
            let unknown = o.outcome == Outcome::Info;
            Entry {
                invoke: o.invoke_us,
                complete: if unknown { u64::MAX } else { o.complete_us },
                required: !unknown,
                kind: o.kind,
                value,
            }
        })
        .collect();
    entries.sort_by_key(|e| e.invoke);
    let n = entries.len();
    let required = entries.iter().filter(|e| e.required).count();
    let words = n.div_ceil(64);
    let mut done = vec![0u64; words];
    // visited (done-set, value) pairs, as 128-bit Zobrist keys: each operation has a random
    // key, a done-set's key is the XOR of its members' (collisions: ~2^-100 at our sizes)
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let zobrist: Vec<u128> = (0..n).map(|_| rng.gen()).collect();
    let mut key: u128 = 0;
    let mut seen: HashSet<(u128, u32)> = HashSet::new();
    let mut longest = 0usize;
    let mut visited = 0usize;

    // explicit DFS: stack of (next candidate index to try, chosen op, value before it)
    struct Frame {
        next: usize,
        chosen: Option<usize>,
        before: u32,
    }
    let mut state = 0u32;
    let mut done_required = 0usize;
    let mut stack = vec![Frame { next: 0, chosen: None, before: 0 }];
    let is_done = |done: &[u64], i: usize| done[i / 64] >> (i % 64) & 1 == 1;
    while let Some(top) = stack.last_mut() {
        if done_required == required {
            return Verdict::Linearizable;
        }
        // the earliest completion among pending required operations bounds what may go next
        let deadline = (0..n).filter(|&i| !is_done(&done, i) && entries[i].required).map(|i| entries[i].complete).min();
        let deadline = deadline.unwrap_or(u64::MAX);
        // A read that may go now and returns the current value goes now, without branching:
        // everything that had to precede it is done, and it leaves the value as it is, so any
        // valid order that places it later stays valid with it moved here.
        let first_pending = (0..n).find(|&i| !is_done(&done, i)).unwrap_or(n);
        let forced = if top.next == 0 {
            (first_pending..n)
                .take_while(|&i| entries[i].invoke <= deadline)
                .find(|&i| !is_done(&done, i) && entries[i].kind == Kind::Read && entries[i].value == state)
        } else {
            None
        };
        let mut advanced = false;
        let mut i = forced.unwrap_or(top.next.max(first_pending));
        while i < n {
            if entries[i].invoke > deadline {
                break; // sorted by invocation: none later can go first either
            }
            if !is_done(&done, i) {
                let e = &entries[i];
                let next_state = match e.kind {
                    Kind::Read if e.value == state => Some(state),
                    Kind::Read => None,
                    Kind::Write => Some(e.value),
                    Kind::Delete => Some(0),
                };
                if let Some(ns) = next_state {
                    done[i / 64] |= 1 << (i % 64);
                    key ^= zobrist[i];
                    if seen.insert((key, ns)) {
                        visited += 1;
                        if visited > budget {
                            return Verdict::Unknown;
                        }
                        // after a forced read, no alternative is tried at this frame
                        top.next = if forced.is_some() { n } else { i + 1 };
                        let before = state;
                        state = ns;
                        if e.required {
                            done_required += 1;
                        }
                        stack.push(Frame { next: 0, chosen: Some(i), before });
                        longest = longest.max(stack.len() - 1);
                        advanced = true;
                        break;
                    }
                    done[i / 64] &= !(1 << (i % 64));
                    key ^= zobrist[i];
                }
            }
            if forced.is_some() {
                break;
            }
            i += 1;
        }
        if advanced {
            continue;
        }
        // dead end: undo this frame's choice
        let f = stack.pop().expect("non-empty");
        if let Some(c) = f.chosen {
            done[c / 64] &= !(1 << (c % 64));
            key ^= zobrist[c];
            state = f.before;
            if entries[c].required {
                done_required -= 1;
            }
        }
    }
    Verdict::Violation { longest_prefix: longest }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: Kind, value: Option<&str>, invoke: u64, complete: u64, outcome: Outcome) -> Op {
        Op {
            client: 0,
            node: 1,
            kind,
            key: "k".into(),
            value: value.map(String::from),
            invoke_us: invoke,
            complete_us: complete,
            outcome,
        }
    }

    fn run(ops: &[Op]) -> Verdict {
        check(&ops.iter().collect::<Vec<_>>(), 1_000_000)
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            op(Kind::Read, None, 0, 1, Outcome::Ok),
            op(Kind::Write, Some("a"), 2, 3, Outcome::Ok),
            op(Kind::Read, Some("a"), 4, 5, Outcome::Ok),
            op(Kind::Delete, None, 6, 7, Outcome::Ok),
            op(Kind::Read, None, 8, 9, Outcome::Ok),
        ];
        assert_eq!(run(&h), Verdict::Linearizable);
    }

    #[test]
    fn stale_read_after_a_completed_write_is_a_violation() {
        let h = [
            op(Kind::Write, Some("a"), 0, 1, Outcome::Ok),
            op(Kind::Write, Some("b"), 2, 3, Outcome::Ok),
            op(Kind::Read, Some("a"), 4, 5, Outcome::Ok),
        ];
        assert!(matches!(run(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn concurrent_operations_may_take_either_order() {
        // the first read overlaps both writes, so "a then read a then b" explains it
        let h = [
            op(Kind::Write, Some("a"), 0, 10, Outcome::Ok),
            op(Kind::Write, Some("b"), 1, 10, Outcome::Ok),
            op(Kind::Read, Some("a"), 2, 11, Outcome::Ok),
            op(Kind::Read, Some("b"), 12, 13, Outcome::Ok),
        ];
        assert_eq!(run(&h), Verdict::Linearizable);
        // after both writes completed, the value cannot flip from a to b with no write between
        let h = [
            op(Kind::Write, Some("a"), 0, 10, Outcome::Ok),
            op(Kind::Write, Some("b"), 1, 10, Outcome::Ok),
            op(Kind::Read, Some("a"), 12, 13, Outcome::Ok),
            op(Kind::Read, Some("b"), 14, 15, Outcome::Ok),
        ];
        assert!(matches!(run(&h), Verdict::Violation { .. }));
    }

    #[test]
    fn unknown_writes_may_or_may_not_happen() {
        let happened = [op(Kind::Write, Some("a"), 0, 1, Outcome::Info), op(Kind::Read, Some("a"), 5, 6, Outcome::Ok)];
        assert_eq!(run(&happened), Verdict::Linearizable);
        let never = [op(Kind::Write, Some("a"), 0, 1, Outcome::Info), op(Kind::Read, None, 5, 6, Outcome::Ok)];
        assert_eq!(run(&never), Verdict::Linearizable);
        // but a read cannot see a value nobody wrote
        let invented = [op(Kind::Read, Some("z"), 5, 6, Outcome::Ok)];
        assert!(matches!(run(&invented), Verdict::Violation { .. }));
    }

    #[test]
    fn a_value_read_then_lost_is_a_violation() {
        let h = [
            op(Kind::Write, Some("a"), 0, 1, Outcome::Ok),
            op(Kind::Read, Some("a"), 2, 3, Outcome::Ok),
            op(Kind::Read, None, 4, 5, Outcome::Ok),
        ];
        assert!(matches!(run(&h), Verdict::Violation { .. }));
    }
}
