"""The project's schema registry works with Confluent's own Python client, unchanged.

Run against a running registry whose URL is in SCHEMA_REGISTRY_URL (the Rust test
`python_confluent_clients_work_against_the_registry_unchanged` in schemas/tests/registry.rs starts
one on a fresh database and runs this file). Every test uses subjects of its own, so the tests
are independent of each other and of their order.
"""

import json
import os
import struct
import uuid

import pytest
from confluent_kafka.schema_registry import (
    ConfigCompatibilityLevel,
    Schema,
    SchemaRegistryClient,
    ServerConfig,
)
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

ORDER_V1 = json.dumps(
    {
        "type": "record",
        "name": "OrderPlaced",
        "namespace": "backbone.orders",
        "fields": [
            {"name": "order_id", "type": "string"},
            {"name": "total_minor", "type": "long"},
        ],
    }
)

# Compatible with v1 under BACKWARD: the new field has a default.
ORDER_V2 = json.dumps(
    {
        "type": "record",
        "name": "OrderPlaced",
        "namespace": "backbone.orders",
        "fields": [
            {"name": "order_id", "type": "string"},
            {"name": "total_minor", "type": "long"},
            {"name": "currency", "type": "string", "default": "EUR"},
        ],
    }
)

# Incompatible with v1 under BACKWARD: a new field without a default.
ORDER_REQUIRED_FIELD = json.dumps(
    {
        "type": "record",
        "name": "OrderPlaced",
        "namespace": "backbone.orders",
        "fields": [
            {"name": "order_id", "type": "string"},
            {"name": "total_minor", "type": "long"},
            {"name": "customer_id", "type": "string"},
        ],
    }
)


def registry_config():
    """The client configuration: the registry's URL and the credentials writes need
    (SCHEMA_REGISTRY_BASIC_AUTH, `user:password`), as Confluent's clients take them."""
    url = os.environ.get("SCHEMA_REGISTRY_URL")
    assert url, "SCHEMA_REGISTRY_URL must name the registry under test"
    user_info = os.environ.get("SCHEMA_REGISTRY_BASIC_AUTH")
    assert user_info, "SCHEMA_REGISTRY_BASIC_AUTH must hold the registry's user:password"
    return {
        "url": url,
        "basic.auth.user.info": user_info,
    }


@pytest.fixture(scope="module")
def client():
    return SchemaRegistryClient(registry_config())


@pytest.fixture
def subject():
    return f"orders-{uuid.uuid4().hex}-value"


def test_registering_and_looking_up_a_schema(client, subject):
    schema_id = client.register_schema(subject, Schema(ORDER_V1, "AVRO"))
    assert schema_id > 0
    # A second client (no cache) registering the same schema gets the same id.
    fresh = SchemaRegistryClient(registry_config())
    assert fresh.register_schema(subject, Schema(ORDER_V1, "AVRO")) == schema_id

    found = fresh.lookup_schema(subject, Schema(ORDER_V1, "AVRO"))
    assert found.schema_id == schema_id
    assert found.subject == subject
    assert found.version == 1

    latest = fresh.get_latest_version(subject)
    assert latest.schema_id == schema_id
    assert latest.version == 1
    assert json.loads(latest.schema.schema_str) == json.loads(ORDER_V1)

    by_id = fresh.get_schema(schema_id)
    assert json.loads(by_id.schema_str) == json.loads(ORDER_V1)
    assert by_id.schema_type == "AVRO"

    assert subject in fresh.get_subjects()
    assert fresh.get_versions(subject) == [1]
    assert fresh.get_version(subject, 1).schema_id == schema_id
    assert fresh.get_subjects_by_schema_id(schema_id) == [subject]
    assert [(v.subject, v.version) for v in fresh.get_schema_versions(schema_id)] == [(subject, 1)]
    assert fresh.get_schema_types() == ["AVRO"]


def test_looking_up_an_unknown_subject_or_schema_fails_with_confluent_codes(client, subject):
    with pytest.raises(SchemaRegistryError) as unknown_subject:
        client.lookup_schema(subject, Schema(ORDER_V1, "AVRO"))
    assert unknown_subject.value.http_status_code == 404
    assert unknown_subject.value.error_code == 40401

    client.register_schema(subject, Schema(ORDER_V1, "AVRO"))
    with pytest.raises(SchemaRegistryError) as unknown_schema:
        client.lookup_schema(subject, Schema(ORDER_V2, "AVRO"))
    assert unknown_schema.value.error_code == 40403

    with pytest.raises(SchemaRegistryError) as unknown_id:
        client.get_schema(2_000_000_000)
    assert unknown_id.value.http_status_code == 404
    assert unknown_id.value.error_code == 40403


def test_compatibility_checks_and_registration_follow_the_configured_level(client, subject):
    client.register_schema(subject, Schema(ORDER_V1, "AVRO"))
    client.set_compatibility(subject, "BACKWARD")
    assert client.get_compatibility(subject) == "BACKWARD"

    assert client.test_compatibility(subject, Schema(ORDER_V2, "AVRO")) is True
    assert client.test_compatibility(subject, Schema(ORDER_REQUIRED_FIELD, "AVRO")) is False
    assert client.test_compatibility(subject, Schema(ORDER_V2, "AVRO"), version=1) is True
    assert client.test_compatibility_all_versions(subject, Schema(ORDER_REQUIRED_FIELD, "AVRO")) is False

    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema(subject, Schema(ORDER_REQUIRED_FIELD, "AVRO"))
    assert refused.value.http_status_code == 409
    assert refused.value.error_code == 409

    v2_id = client.register_schema(subject, Schema(ORDER_V2, "AVRO"))
    assert client.get_latest_version(subject).version == 2
    assert client.get_version(subject, 2).schema_id == v2_id

    # With NONE anything goes.
    assert client.set_compatibility(subject, "NONE") == {"compatibility": "NONE"}
    assert client.test_compatibility(subject, Schema(ORDER_REQUIRED_FIELD, "AVRO")) is True


def test_config_can_be_set_read_and_removed(client, subject):
    client.register_schema(subject, Schema(ORDER_V1, "AVRO"))
    assert client.get_compatibility() in {
        "NONE",
        "BACKWARD",
        "BACKWARD_TRANSITIVE",
        "FORWARD",
        "FORWARD_TRANSITIVE",
        "FULL",
        "FULL_TRANSITIVE",
    }
    client.set_config(subject, ServerConfig(compatibility=ConfigCompatibilityLevel.FULL_TRANSITIVE))
    config = client.get_config(subject)
    assert config.compatibility_level == ConfigCompatibilityLevel.FULL_TRANSITIVE

    deleted = client.delete_config(subject)
    assert deleted.compatibility_level == ConfigCompatibilityLevel.FULL_TRANSITIVE
    with pytest.raises(SchemaRegistryError) as no_config:
        client.get_config(subject)
    assert no_config.value.error_code == 40408

    with pytest.raises(SchemaRegistryError) as bad_level:
        client.set_compatibility(subject, "SIDEWAYS")
    assert bad_level.value.http_status_code == 422
    assert bad_level.value.error_code == 42203


def test_versions_and_subjects_are_soft_deleted_then_permanently(client, subject):
    v1_id = client.register_schema(subject, Schema(ORDER_V1, "AVRO"))
    client.register_schema(subject, Schema(ORDER_V2, "AVRO"))

    # A permanent delete needs a soft delete first.
    with pytest.raises(SchemaRegistryError) as not_soft_deleted:
        client.delete_version(subject, 1, permanent=True)
    assert not_soft_deleted.value.error_code == 40407

    assert client.delete_version(subject, 1) == 1
    assert client.get_versions(subject) == [2]
    with pytest.raises(SchemaRegistryError) as hidden:
        client.get_version(subject, 1)
    assert hidden.value.error_code == 40402
    # The id of a soft-deleted version still resolves: old messages stay readable.
    fresh = SchemaRegistryClient(registry_config())
    assert json.loads(fresh.get_schema(v1_id).schema_str) == json.loads(ORDER_V1)

    assert client.delete_version(subject, 1, permanent=True) == 1

    with pytest.raises(SchemaRegistryError) as subject_not_soft_deleted:
        client.delete_subject(subject, permanent=True)
    assert subject_not_soft_deleted.value.error_code == 40405

    assert client.delete_subject(subject) == [2]
    assert subject not in client.get_subjects()
    assert subject in client.get_subjects(deleted=True)
    assert client.delete_subject(subject, permanent=True) == [2]
    assert subject not in client.get_subjects(deleted=True)

    with pytest.raises(SchemaRegistryError) as gone:
        client.get_latest_version(subject)
    assert gone.value.error_code == 40401


def test_the_avro_serializer_and_deserializer_round_trip_a_record(client):
    topic = f"orders-{uuid.uuid4().hex}"
    serializer = AvroSerializer(client, ORDER_V2, conf={"auto.register.schemas": True})
    fresh = SchemaRegistryClient(registry_config())
    deserializer = AvroDeserializer(fresh)
    context = SerializationContext(topic, MessageField.VALUE)

    record = {"order_id": "o-1", "total_minor": 12_345, "currency": "SEK"}
    payload = serializer(record, context)

    # Confluent wire format: magic byte 0, then the 4-byte big-endian schema id.
    assert payload[0] == 0
    (schema_id,) = struct.unpack(">I", payload[1:5])
    assert client.get_latest_version(f"{topic}-value").schema_id == schema_id

    assert deserializer(payload, context) == record


def test_a_client_without_credentials_reads_but_cannot_write(client, subject):
    schema_id = client.register_schema(subject, Schema(ORDER_V1, "AVRO"))
    anonymous = SchemaRegistryClient({"url": os.environ["SCHEMA_REGISTRY_URL"]})
    assert json.loads(anonymous.get_schema(schema_id).schema_str) == json.loads(ORDER_V1)
    for write in (
        lambda: anonymous.register_schema(subject, Schema(ORDER_V2, "AVRO")),
        lambda: anonymous.set_compatibility(subject, "NONE"),
        lambda: anonymous.delete_subject(subject, permanent=True),
    ):
        with pytest.raises(SchemaRegistryError) as refused:
            write()
        assert refused.value.http_status_code == 401
    assert client.get_versions(subject) == [1]
