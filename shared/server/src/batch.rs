//! Group commit: concurrent callers share one unit of work (one transaction,
//! one WAL flush) instead of paying for one each. A caller waits only for the
//! group already being written; each is answered once its group's writer
//! returns, in the order the group was gathered.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The batcher stopped (shutdown) before the item was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the group commit is shutting down")]
pub struct Closed;

/// Hands items to `writers` tasks that each take whatever is waiting (at
/// most `max`) and write it as one group: while one writer commits, the next
/// gathers and writes its group.
pub struct GroupCommit<T, A> {
    queue: mpsc::Sender<(T, oneshot::Sender<A>)>,
}

impl<T, A> Clone for GroupCommit<T, A> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<T: Send + 'static, A: Send + 'static> GroupCommit<T, A> {
    /// Starts the writers. `write` gets a group and returns one answer per
    /// item, in order; an item it leaves unanswered gets [`Closed`].
    pub fn start<F, Fut>(max: usize, writers: usize, shutdown: &CancellationToken, write: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<A>> + Send,
    {
        let max = max.max(1);
        let (queue, receiver) = mpsc::channel(max * writers.max(1));
        let receiver = Arc::new(Mutex::new(receiver));
        let write = Arc::new(write);
        for _ in 0..writers.max(1) {
            let receiver = receiver.clone();
            let shutdown = shutdown.clone();
            let write = write.clone();
            tokio::spawn(async move {
                loop {
                    let group = {
                        let mut receiver = receiver.lock().await;
                        let first = tokio::select! {
                            first = receiver.recv() => first,
                            () = shutdown.cancelled() => None,
                        };
                        let Some(first) = first else { return };
                        let mut group = vec![first];
                        while group.len() < max {
                            match receiver.try_recv() {
                                Ok(next) => group.push(next),
                                Err(_) => break,
                            }
                        }
                        group
                    };
                    let (items, replies): (Vec<T>, Vec<oneshot::Sender<A>>) =
                        group.into_iter().unzip();
                    let answers = write(items).await;
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(answer);
                    }
                }
            });
        }
        Self { queue }
    }

    /// Queues `item` for the next group and waits for its answer.
    pub async fn submit(&self, item: T) -> Result<A, Closed> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((item, reply)).await.map_err(|_| Closed)?;
        answer.await.map_err(|_| Closed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn concurrent_items_share_groups_and_each_gets_its_answer() {
        let shutdown = CancellationToken::new();
        let groups = Arc::new(Mutex::new(Vec::<usize>::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let (seen, counted) = (groups.clone(), calls.clone());
        let batcher = GroupCommit::start(4, 1, &shutdown, move |items: Vec<u32>| {
            let (seen, counted) = (seen.clone(), counted.clone());
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                seen.lock().await.push(items.len());
                // Long enough for the others to queue up behind this group.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                items.into_iter().map(|i| i * 10).collect::<Vec<_>>()
            }
        });
        let answers = futures_join(&batcher, 0..10).await;
        assert_eq!(answers, (0..10).map(|i| Ok(i * 10)).collect::<Vec<_>>());
        let groups = groups.lock().await.clone();
        assert_eq!(groups.iter().sum::<usize>(), 10);
        assert!(groups.iter().all(|&n| n <= 4), "groups {groups:?}");
        assert!(
            calls.load(Ordering::SeqCst) < 10,
            "items were not grouped: {groups:?}"
        );
    }

    #[tokio::test]
    async fn an_unanswered_item_and_a_stopped_batcher_say_closed() {
        let shutdown = CancellationToken::new();
        let batcher = GroupCommit::start(8, 2, &shutdown, |_items: Vec<u32>| async {
            Vec::<u32>::new()
        });
        assert_eq!(batcher.submit(1).await, Err(Closed));
        shutdown.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while batcher.submit(2).await != Err(Closed) {}
        })
        .await
        .expect("a stopped batcher answers Closed");
    }

    async fn futures_join(
        batcher: &GroupCommit<u32, u32>,
        items: std::ops::Range<u32>,
    ) -> Vec<Result<u32, Closed>> {
        let tasks: Vec<_> = items
            .map(|i| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.submit(i).await })
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.expect("task"));
        }
        answers
    }
}
