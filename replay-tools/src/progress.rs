//! What every long command shares: a progress bar (events done, rate, ETA) and a clean stop on
//! Ctrl-C.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

/// A progress bar over `total` events (or a spinner when the total is unknown), drawn on
/// stderr so stdout stays the command's output; hidden when stderr is not a terminal.
pub fn bar(what: &str, total: Option<u64>) -> ProgressBar {
    let bar = match total {
        Some(total) => ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
    };
    let template = if total.is_some() {
        "{msg:>12} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} events, {per_sec}, ETA {eta}"
    } else {
        "{msg:>12} [{elapsed_precise}] {spinner} {human_pos} events, {per_sec}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

/// A token cancelled by the first Ctrl-C (SIGINT) or SIGTERM: long commands check it between
/// batches, finish the batch in hand, record where they stopped and exit. The same signal
/// handling as every backbone process (`streams::process::shutdown_token`).
pub fn interrupted() -> CancellationToken {
    streams::process::shutdown_token()
}
