"""Split pooled records into clients: by a field (natural), IID, or Dirichlet(alpha) over labels."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from knowledgesg.errors import SpecError
from knowledgesg.records import Record
from knowledgesg.spec import PartitionSpec, unsafe_identifier_reason

MAX_DIRICHLET_DRAWS = 100


def client_names(spec: PartitionSpec, count: int) -> list[str]:
    return list(spec.names) if spec.names else [f"client_{i}" for i in range(count)]


def _field(record: Record, name: str, key: str) -> str:
    """The record's value in field `name`, which the spec's `clients.partition.<key>` named."""
    value = getattr(record, name, None)
    if value is None or value == "":
        # the record named by its source, not its id: an id may itself be private (a patient number),
        # and this line reaches the run's event log
        raise SpecError(f"clients.partition.{key}: a record of source '{record.source}' has no value in field '{name}' to partition by")
    return str(value)


def partition_natural(records: list[Record], spec: PartitionSpec) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        value = _field(record, spec.field, "field")
        reason = unsafe_identifier_reason(value) if not spec.names else None
        if reason:  # the value becomes a client id, and so a directory name
            raise SpecError(f"clients.partition.field: a record of source '{record.source}' holds in field '{spec.field}' a value that cannot name a client "
                            f"({reason}); give clients.partition.names")
        groups[value].append(record)
    values = sorted(groups)
    expected = spec.num_clients or (len(spec.names) if spec.names else None)
    if expected is not None and expected != len(values):
        # no count of the data's values: this line may reach the run's event log
        raise SpecError(f"clients.partition: field '{spec.field}' does not have {expected} distinct values, one for each client asked for")
    if spec.names:
        return {name: groups[value] for name, value in zip(spec.names, values)}
    return {value: groups[value] for value in values}


def partition_iid(records: list[Record], spec: PartitionSpec, rng: np.random.Generator) -> dict[str, list[Record]]:
    names = client_names(spec, spec.num_clients or len(spec.names or []))
    order = rng.permutation(len(records))
    return {name: [records[i] for i in sorted(part)] for name, part in zip(names, np.array_split(order, len(names)))}


def partition_dirichlet(records: list[Record], spec: PartitionSpec, rng: np.random.Generator) -> dict[str, list[Record]]:
    """For each label, client shares ~ Dir(alpha); redrawn until every client has enough records.

    The redraw (the usual practice since Hsu et al. 2019) keeps tiny alphas from leaving a
    client empty; past MAX_DIRICHLET_DRAWS we stop and say so rather than loop forever.
    """
    names = client_names(spec, spec.num_clients or len(spec.names or []))
    by_label: dict[str, list[int]] = defaultdict(list)
    unlabelled = []  # text records have no label: they are dealt out evenly instead
    for index, record in enumerate(records):
        if record.kind == "text" and not hasattr(record, spec.label_field):
            unlabelled.append(index)
        else:
            by_label[_field(record, spec.label_field, "label_field")].append(index)
    spread = np.array_split(np.array(unlabelled, dtype=int)[rng.permutation(len(unlabelled))], len(names))
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[int]] = [chunk.tolist() for chunk in spread]
        for label in sorted(by_label):
            indices = np.array(by_label[label])[rng.permutation(len(by_label[label]))]
            shares = rng.dirichlet([spec.alpha] * len(names))
            cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
            for part, chunk in zip(parts, np.split(indices, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= spec.min_client_records:
            return {name: [records[i] for i in sorted(part)] for name, part in zip(names, parts)}
    raise SpecError(
        f"clients.partition: Dirichlet(alpha={spec.alpha}) left a client with fewer than {spec.min_client_records} records "
        f"in {MAX_DIRICHLET_DRAWS} draws over {len(records)} records; raise alpha or lower num_clients"
    )


def partition(records: list[Record], spec: PartitionSpec, seed: int) -> dict[str, list[Record]]:
    """Clients in a stable order, each with its records in input order."""
    rng = np.random.default_rng(seed)
    if spec.method == "natural":
        clients = partition_natural(records, spec)
    elif spec.method == "iid":
        clients = partition_iid(records, spec, rng)
    else:
        clients = partition_dirichlet(records, spec, rng)
    for name, part in clients.items():
        if len(part) < spec.min_client_records:
            raise SpecError(f"clients.partition: client '{name}' got {'no' if spec.min_client_records == 1 else f'fewer than {spec.min_client_records}'} records; "
                           "use fewer clients or more data")
    return clients
