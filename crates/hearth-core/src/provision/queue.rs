//! A delay queue: work items due at an instant, each queued at most once, handed out by one
//! scheduler in due order. Waiting for a retry is an entry here, not a sleeping task.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct DelayQueue<T> {
    state: Mutex<State<T>>,
    wake: Notify,
}

#[derive(Debug)]
struct State<T> {
    /// (due, sequence, item): the sequence keeps items due at one instant in queueing order.
    heap: BinaryHeap<Reverse<(Instant, u64, T)>>,
    queued: HashSet<T>,
    seq: u64,
}

impl<T: Ord + Hash + Clone> DelayQueue<T> {
    pub(crate) fn new() -> Self {
        let state = State { heap: BinaryHeap::new(), queued: HashSet::new(), seq: 0 };
        Self { state: Mutex::new(state), wake: Notify::new() }
    }

    /// Queues `item` at `due`, unless it is queued already (the earlier entry stands).
    pub(crate) fn push(&self, item: T, due: Instant) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !s.queued.insert(item.clone()) {
            return;
        }
        s.seq += 1;
        let seq = s.seq;
        s.heap.push(Reverse((due, seq, item)));
        drop(s);
        // A permit is kept when the scheduler is not waiting yet, so no wake-up is lost.
        self.wake.notify_one();
    }

    /// The next item, once it is due.
    pub(crate) async fn next(&self) -> T {
        loop {
            let due = {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                match s.heap.peek().map(|Reverse((due, _, _))| *due) {
                    Some(due) if due <= Instant::now() => {
                        let Some(Reverse((_, _, item))) = s.heap.pop() else { continue };
                        s.queued.remove(&item);
                        return item;
                    }
                    other => other,
                }
            };
            match due {
                Some(due) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }

    /// How many items are waiting.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).heap.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn items_come_out_in_due_order_once_each_and_not_before_they_are_due() {
        let q = DelayQueue::new();
        let t0 = Instant::now();
        q.push("late", t0 + Duration::from_secs(5));
        q.push("soon", t0 + Duration::from_secs(1));
        q.push("soon", t0 + Duration::from_secs(9));
        assert_eq!(q.len(), 2, "an item queued twice is queued once");
        assert_eq!(q.next().await, "soon");
        assert_eq!(Instant::now() - t0, Duration::from_secs(1));
        assert_eq!(q.next().await, "late");
        assert_eq!(Instant::now() - t0, Duration::from_secs(5));
        q.push("soon", t0);
        assert_eq!(q.next().await, "soon", "once out, an item can be queued again");
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_queued_while_the_scheduler_waits_wakes_it() {
        let q = std::sync::Arc::new(DelayQueue::new());
        let t0 = Instant::now();
        q.push("far", t0 + Duration::from_secs(60));
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.next().await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        q.push("now", Instant::now());
        assert_eq!(waiter.await.expect("join"), "now");
        assert!(Instant::now() - t0 < Duration::from_secs(60));
    }
}
