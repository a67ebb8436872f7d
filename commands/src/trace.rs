//! W3C trace context (`traceparent`) of commands and the events they cause, so that one
//! order's commands, publications and projections form one trace across processes.
//!
//! The API continues a caller's `traceparent` (or the order's own trace), the command bus
//! stores its command span's context in every event's metadata, the relay carries it on as a
//! Kafka header, and consumers start their spans under it. Exporting is the binaries' business
//! (see `streams::process::init_tracing`); without an exporter the spans have no OpenTelemetry
//! context and a caller's `traceparent` is passed on unchanged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The metadata key, Kafka header and HTTP header of the trace context (W3C Trace Context).
pub const TRACEPARENT: &str = "traceparent";

/// Whether this process exports traces (see `streams::telemetry`).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Records that this process exports traces: the per-event spans (a publication, a
/// projection) are made only then, so that a process without an exporter does not build, and
/// its log layer format, a span for every event it moves.
pub fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

/// Whether this process exports traces.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// A valid W3C `traceparent` value (`00-<trace id>-<parent span id>-<flags>`), in canonical
/// form, with the span context it names (read once, when parsed).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceParent {
    header: String,
    context: SpanContext,
}

impl TraceParent {
    /// Reads a `traceparent` value; `None` if it is not a valid one (all-zero ids, wrong
    /// lengths, unknown version layout), which W3C says to ignore rather than refuse.
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        // The propagator pads short ids; the header's fields have fixed lengths of lowercase
        // hex (future versions may append fields, which it handles).
        let fields: Vec<&str> = value.split('-').collect();
        let shaped = fields.len() >= 4
            && fields.iter().zip([2, 32, 16, 2]).all(|(field, len)| {
                field.len() == len
                    && field
                        .bytes()
                        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            });
        if !shaped {
            return None;
        }
        let carrier = HashMap::from([(TRACEPARENT.to_owned(), value.to_owned())]);
        Self::of_context(&TraceContextPropagator::new().extract(&carrier))
    }

    /// The trace context of `span`; `None` without an OpenTelemetry layer (tracing off) or
    /// for a span that is not recorded.
    pub fn of(span: &tracing::Span) -> Option<Self> {
        Self::of_context(&span.context())
    }

    fn of_context(context: &opentelemetry::Context) -> Option<Self> {
        let found = context.span().span_context().clone();
        if !found.is_valid() {
            return None;
        }
        // As the header reads back: a remote parent with only the sampled flag and no trace
        // state (`tracestate` is not carried).
        let span_context = SpanContext::new(
            found.trace_id(),
            found.span_id(),
            found.trace_flags() & TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(context, &mut carrier);
        carrier.remove(TRACEPARENT).map(|header| Self {
            header,
            context: span_context,
        })
    }

    /// Makes this the parent of `span`, which must not have been entered yet (a span's parent
    /// is fixed once it starts). Without an OpenTelemetry layer this does nothing.
    pub fn adopt(&self, span: &tracing::Span) {
        let parent = opentelemetry::Context::new().with_remote_span_context(self.context.clone());
        // Refused only when tracing is off or the span already started: either way the span
        // keeps the parent it has, which is all a trace can lose here.
        let _ = span.set_parent(parent);
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> &str {
        self.header.get(3..35).unwrap_or_default()
    }

    pub fn as_str(&self) -> &str {
        &self.header
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_traceparents_are_kept_and_invalid_ones_ignored() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(good).expect("a valid traceparent");
        assert_eq!(parsed.as_str(), good);
        assert_eq!(parsed.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_kept_context_is_the_one_its_header_reads_back_as() {
        for header in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        ] {
            let parsed = TraceParent::parse(header).expect("valid");
            let carrier = HashMap::from([(TRACEPARENT.to_owned(), parsed.to_string())]);
            let read_back = TraceContextPropagator::new().extract(&carrier);
            assert_eq!(&parsed.context, read_back.span().span_context(), "{header}");
        }
    }

    #[test]
    fn without_an_opentelemetry_layer_a_span_has_no_trace_context() {
        let span = tracing::info_span!("command");
        assert_eq!(TraceParent::of(&span), None);
        // Adopting a parent is then harmless.
        TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid")
            .adopt(&span);
    }
}
