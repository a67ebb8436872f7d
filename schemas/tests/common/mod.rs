//! Checks every aggregate's contract tests share.

use std::collections::BTreeSet;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use cqrs_es::DomainEvent;
use schemas::Contracts;

/// The event types with a contract, the declared event types and the sampled ones are the same
/// set, and each sample's version is its contract's version.
pub fn assert_every_event_type_has_a_contract<E: DomainEvent>(
    aggregate_type: &str,
    declared: &[&str],
    samples: &[E],
) {
    let contracts = Contracts::load().expect("contracts parse");
    let with_contract: BTreeSet<String> = contracts
        .iter()
        .filter(|c| c.aggregate_type == aggregate_type)
        .map(|c| c.event_type.to_owned())
        .collect();
    let declared: BTreeSet<String> = declared.iter().map(|s| (*s).to_owned()).collect();
    let sampled: BTreeSet<String> = samples.iter().map(DomainEvent::event_type).collect();
    assert_eq!(with_contract, declared, "contracts of {aggregate_type}");
    assert_eq!(sampled, declared, "samples of {aggregate_type}");
    for event in samples {
        let contract = contracts
            .get(aggregate_type, &event.event_type())
            .expect("contract exists");
        assert_eq!(
            contract.event_version,
            event.event_version(),
            "{}",
            contract.event_type
        );
    }
}

/// Every sample survives domain event → Avro value → Avro bytes → Avro value → domain event.
pub fn assert_round_trips<E: DomainEvent>(aggregate_type: &str, samples: Vec<E>) {
    let contracts = Contracts::load().expect("contracts parse");
    for event in samples {
        let (contract, value) = contracts
            .event_to_avro(aggregate_type, &event)
            .expect("event maps to its contract");
        let bytes = GenericDatumWriter::builder(&contract.schema)
            .build()
            .and_then(|w| w.write_value_to_vec(value))
            .expect("value fits the schema");
        let decoded = GenericDatumReader::builder(&contract.schema)
            .build()
            .and_then(|r| r.read_value(&mut bytes.as_slice()))
            .expect("bytes decode");
        let back: E = contracts
            .avro_to_event(contract, decoded.clone())
            .expect("value maps back");
        assert_eq!(back, event, "{}", contract.event_type);
        let via_json: E = contracts
            .avro_to_event_via_json(contract, decoded)
            .expect("value maps back through JSON");
        assert_eq!(via_json, event, "{} through JSON", contract.event_type);
    }
}
