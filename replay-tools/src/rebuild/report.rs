//! What a rebuild did and where its time went.

use super::*;

/// The rebuild's figures.
pub(super) fn report_build(
    out: &mut impl Write,
    rebuild: &Rebuild,
    source: Source,
    completed: bool,
    tally: &Tally,
    elapsed: Duration,
) -> anyhow::Result<()> {
    let live = rebuild.schemas.live;
    let schemas = &rebuild.schemas;
    writeln!(
        out,
        "{live}: {} into {} from the {}{}: {} events read, {} applied, {} duplicates, {} after a \
         missing one (gaps), {} dead letters{}, in {:.1} s ({:.0} events/s)",
        if completed {
            "rebuilt"
        } else {
            "interrupted rebuild"
        },
        schemas.shadow,
        source.as_str(),
        rebuild
            .as_of
            .map(|t| format!(" as of {}", t.to_rfc3339_opts(SecondsFormat::Micros, true)))
            .unwrap_or_default(),
        tally.read,
        tally.applied,
        tally.duplicates,
        tally.gaps,
        tally.dead,
        if tally.later > 0 {
            format!(", {} recorded after the as-of instant", tally.later)
        } else {
            String::new()
        },
        elapsed.as_secs_f64(),
        tally.read as f64 / elapsed.as_secs_f64().max(1e-9),
    )?;
    writeln!(out, "{live}: {}", rebuild.profile.describe())?;
    Ok(())
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Tally {
    pub(super) read: u64,
    pub(super) applied: u64,
    pub(super) duplicates: u64,
    pub(super) gaps: u64,
    pub(super) dead: u64,
    /// Recorded after the as-of instant: not applied.
    pub(super) later: u64,
}

/// Where a run's time went, per phase (wall-clock; the reader's phases overlap the applier's,
/// which runs beside it). Printed with the result: what to look at before tuning a rebuild.
#[derive(Debug, Default)]
pub(super) struct Profile {
    /// The reader waiting for records (broker fetches) or rows (the store's cursor).
    pub(super) read: Phase,
    /// Decoding records through the registry, or mapping stored rows through the contracts.
    pub(super) decode: Phase,
    /// The reader waiting for the applier to take a batch.
    pub(super) handover: Phase,
    /// The applier waiting for a batch.
    pub(super) starved: Phase,
    /// Opening the transaction (pointing its names at the shadow).
    pub(super) enter: Phase,
    /// Dedup and the projection's handlers.
    pub(super) handlers: Phase,
    /// Dead letters, checkpoints and the rebuild's state.
    pub(super) bookkeeping: Phase,
    /// The commit.
    pub(super) commit: Phase,
    /// Making the shadow durable and building its query-only indexes, once at the end.
    pub(super) finish: Phase,
    /// Transactions that committed.
    pub(super) transactions: AtomicU64,
}

/// Time spent in one phase, in nanoseconds.
#[derive(Debug, Default)]
pub(super) struct Phase(AtomicU64);

impl Phase {
    pub(super) fn add(&self, since: Instant) {
        let nanos = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_add(nanos, Ordering::Relaxed);
    }

    pub(super) fn seconds(&self) -> f64 {
        self.0.load(Ordering::Relaxed) as f64 / 1e9
    }
}

impl Profile {
    pub(super) fn describe(&self) -> String {
        format!(
            "reader: {:.1} s waiting for events, {:.1} s decoding, {:.1} s waiting for the \
             applier; applier: {:.1} s waiting for the reader, {:.1} s opening transactions, {:.1} s \
             dedup and handlers, {:.1} s bookkeeping, {:.1} s committing, \
             {} transactions; then {:.1} s making the tables durable and building the \
             query-only indexes",
            self.read.seconds(),
            self.decode.seconds(),
            self.handover.seconds(),
            self.starved.seconds(),
            self.enter.seconds(),
            self.handlers.seconds(),
            self.bookkeeping.seconds(),
            self.commit.seconds(),
            self.transactions.load(Ordering::Relaxed),
            self.finish.seconds()
        )
    }
}

impl Tally {
    pub(super) fn add(&mut self, other: &Self) {
        self.read += other.read;
        self.applied += other.applied;
        self.duplicates += other.duplicates;
        self.gaps += other.gaps;
        self.dead += other.dead;
        self.later += other.later;
    }
}
