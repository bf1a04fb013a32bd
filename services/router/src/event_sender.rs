//! Delivers the engine's events to the requests' channels from a thread of its own, so the
//! engine thread hands over a whole step's events at once (one wake-up) and starts the next step
//! while the requests' stream tasks are woken, one by one.

use std::sync::mpsc as std_mpsc;

use dsv2_core::engine::EngineEvent;
use tokio::sync::mpsc;

/// Steps of events the delivery thread may lag behind before the engine thread waits for it.
const QUEUED_STEPS: usize = 64;

type Batch = Vec<(mpsc::Sender<EngineEvent>, EngineEvent)>;

/// The engine thread's side: events are queued with [`EventSender::push`] and leave with
/// [`EventSender::flush`]. Every event of the engine goes through one of these, so a request's
/// events arrive in the order they were pushed.
pub struct EventSender {
    batch: Batch,
    tx: std_mpsc::SyncSender<Batch>,
}

impl EventSender {
    /// Starts the delivery thread; it ends once this sender is dropped and its queue is empty.
    pub fn spawn() -> std::io::Result<EventSender> {
        let (tx, rx) = std_mpsc::sync_channel::<Batch>(QUEUED_STEPS);
        std::thread::Builder::new()
            .name("dsv2-events".into())
            .spawn(move || {
                for batch in rx {
                    for (to, ev) in batch {
                        // Each request's channel holds all of its events, so this fails only if
                        // the client left (the engine cancels it before its next step).
                        let _ = to.try_send(ev);
                    }
                }
            })?;
        Ok(EventSender {
            batch: Vec::new(),
            tx,
        })
    }

    /// Queues `ev` for `to` (a clone of the request's sender: the request may leave the engine
    /// before the event is delivered).
    pub fn push(&mut self, to: &mpsc::Sender<EngineEvent>, ev: EngineEvent) {
        self.batch.push((to.clone(), ev));
    }

    /// Hands the queued events to the delivery thread.
    pub fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        if let Err(std_mpsc::SendError(batch)) = self.tx.send(batch) {
            // The delivery thread is gone (it panicked): deliver here rather than lose events.
            for (to, ev) in batch {
                let _ = to.try_send(ev);
            }
        }
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: u64, token: u32) -> EngineEvent {
        EngineEvent::Token {
            id,
            token,
            text: String::new(),
            logprob: None,
        }
    }

    #[test]
    fn events_arrive_in_order_and_only_after_a_flush() {
        let mut out = EventSender::spawn().expect("thread");
        let (a_tx, mut a_rx) = mpsc::channel(8);
        let (b_tx, mut b_rx) = mpsc::channel(8);
        out.push(&a_tx, token(1, 10));
        out.push(&b_tx, token(2, 20));
        out.push(&a_tx, token(1, 11));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(a_rx.try_recv().is_err(), "delivered before the flush");
        out.flush();
        // the request's own sender may be gone by the time its events are delivered
        drop(a_tx);
        let got = |ev: Option<EngineEvent>| match ev {
            Some(EngineEvent::Token { id, token, .. }) => (id, token),
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(got(a_rx.blocking_recv()), (1, 10));
        assert_eq!(got(a_rx.blocking_recv()), (1, 11));
        assert_eq!(got(b_rx.blocking_recv()), (2, 20));
        out.push(&b_tx, token(2, 21));
        // dropping the sender flushes what is queued, then the thread ends
        drop(out);
        assert_eq!(got(b_rx.blocking_recv()), (2, 21));
        drop(b_tx);
        assert!(b_rx.blocking_recv().is_none());
        assert!(a_rx.blocking_recv().is_none());
    }
}
