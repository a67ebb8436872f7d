//! What every consumer of the event log does with a batch that fails, so that one poison event
//! neither stops its stream nor takes its neighbours down with it. The projector (read models and
//! process managers) and `replay-tools rebuild` both apply their batches through
//! [`apply_isolating`], so a rebuilt read model dead-letters exactly what the live one would.

use std::fmt::Display;
use std::future::Future;
use std::ops::Range;
use std::time::Duration;

/// Applies the items `0..len` with `apply(range, dead_letter)`:
///
/// 1. the whole batch, up to `attempts` times with a growing pause, since most failures pass (a
///    deadlock, a failover, a restart);
/// 2. then each item on its own, up to `attempts` times; an item that still fails is applied once
///    more with `Some(its last error)`, which must dead-letter it instead of applying it.
///
/// A failure `passing` calls temporary (appliers side by side meeting on shared rows) is retried
/// after a short pause without counting as an attempt: it is not the batch's fault.
///
/// Returns what each successful call returned, in order; the error of a call that dead-letters.
pub async fn apply_isolating<T, E, F, Fut>(
    len: usize,
    attempts: u32,
    passing: impl Fn(&E) -> bool,
    mut apply: F,
) -> Result<Vec<T>, E>
where
    F: FnMut(Range<usize>, Option<String>) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Display,
{
    let mut attempt = 0;
    loop {
        match apply(0..len, None).await {
            Ok(done) => return Ok(vec![done]),
            Err(e) if passing(&e) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => {
                attempt += 1;
                if attempt >= attempts {
                    tracing::warn!(error = %e, "batch failed; isolating the failing events");
                    break;
                }
                tracing::warn!(error = %e, attempt, "batch failed; retrying");
                tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
            }
        }
    }
    let mut applied = Vec::with_capacity(len);
    for index in 0..len {
        let mut last_error = None;
        for attempt in 1..=attempts {
            match apply(index..index + 1, None).await {
                Ok(done) => {
                    applied.push(done);
                    last_error = None;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "event failed");
                    last_error = Some(e.to_string());
                }
            }
        }
        if let Some(error) = last_error {
            applied.push(apply(index..index + 1, Some(error)).await?);
        }
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Items 0..5 where item 2 always fails: the batch is tried `attempts` times, then each item,
    /// and only item 2 is dead-lettered, with its error.
    #[tokio::test]
    async fn a_poison_item_is_dead_lettered_alone() {
        let calls = RefCell::new(Vec::new());
        let applied = apply_isolating(
            5,
            3,
            |_: &String| false,
            |range, dead_letter| {
                calls
                    .borrow_mut()
                    .push((range.clone(), dead_letter.clone()));
                let result = if dead_letter.is_some() {
                    Ok(format!(
                        "dead-lettered {range:?}: {}",
                        dead_letter.unwrap_or_default()
                    ))
                } else if range.contains(&2) {
                    Err("item 2 is poison".to_owned())
                } else {
                    Ok(format!("applied {range:?}"))
                };
                async move { result }
            },
        )
        .await
        .expect("dead-lettering succeeds");
        assert_eq!(
            applied,
            [
                "applied 0..1",
                "applied 1..2",
                "dead-lettered 2..3: item 2 is poison",
                "applied 3..4",
                "applied 4..5"
            ]
        );
        let calls = calls.into_inner();
        let whole = calls.iter().filter(|(r, _)| *r == (0..5)).count();
        let alone = calls
            .iter()
            .filter(|(r, d)| *r == (2..3) && d.is_none())
            .count();
        assert_eq!((whole, alone), (3, 3), "{calls:?}");
    }

    /// A passing failure is retried without using up the attempts.
    #[tokio::test]
    async fn passing_failures_do_not_count() {
        let failures = RefCell::new(5);
        let applied = apply_isolating(
            2,
            1,
            |e: &&str| *e == "contention",
            |range, _| {
                let mut left = failures.borrow_mut();
                let result = if *left > 0 {
                    *left -= 1;
                    Err("contention")
                } else {
                    Ok(range.len())
                };
                async move { result }
            },
        )
        .await
        .expect("applies once the contention passes");
        assert_eq!(applied, [2], "the whole batch, applied once");
    }
}
