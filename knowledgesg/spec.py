"""The pipeline spec: one YAML file that says what a run does, validated strictly.

Unknown or mistyped keys are errors that name the key and the file: a typo in a privacy
setting must never be silently ignored.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, ValidationInfo, field_validator, model_validator

from knowledgesg.builtin_data import BUILTINS
from knowledgesg.records import ID_FIELDS, REQUIRED_FIELDS, unpaired_surrogate
from knowledgesg.errors import InputError
from privacy.accounting import NOISE_MULTIPLIER_RANGE

DataFormat = Literal["auto", "jsonl", "json", "csv", "parquet", "hf_disk"]


def repeated(values: list[str]) -> list[str]:
    """The values that occur more than once, sorted."""
    return sorted({v for v in values if values.count(v) > 1})


def repeated_as_directories(names: list[str]) -> list[str]:
    """Names that are one directory on a case-insensitive file system (macOS, Windows): `A`, `a`."""
    folded = [n.casefold() for n in names]
    return sorted({n for n, f in zip(names, folded) if folded.count(f) > 1})


SAFE_IDENTIFIER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def unsafe_identifier_reason(value: str) -> str | None:
    """Why `value` may not name a client, run or source (it becomes a path), or None if it may."""
    if not SAFE_IDENTIFIER.fullmatch(value):
        return "use 1 to 64 letters, digits, '_', '-' or '.', not starting with '.' or '-'"
    if ".." in value:
        return "'..' is not allowed"
    return None


def safe_identifier(value: str) -> str:
    reason = unsafe_identifier_reason(value)
    if reason:
        raise ValueError(f"unsafe identifier {value!r}: {reason}")
    return value


SafeId = Annotated[str, AfterValidator(safe_identifier)]


def _scalar_types(annotation: Any) -> set[type]:
    """The plain types a field's annotation admits (through Optional, unions and Annotated)."""
    if get_origin(annotation) is Annotated:
        return _scalar_types(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return set().union(*(_scalar_types(arg) for arg in get_args(annotation)))
    return {annotation} if isinstance(annotation, type) else set()


def _bool_for_number(annotation: Any, value: Any) -> bool:
    """A YAML true/false where only a number fits (pydantic reads it as 1 or 0: `epsilon: true`
    would run at epsilon 1), at the top level or in a list or mapping of numbers."""
    if isinstance(value, bool):
        admitted = _scalar_types(annotation)
        return bool(admitted & {int, float}) and bool not in admitted
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (list, tuple, set, frozenset) and args and isinstance(value, (list, tuple)):
        return any(_bool_for_number(args[0], item) for item in value)
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return any(_bool_for_number(args[1], item) for item in value.values())
    return False


class StrictModel(BaseModel):
    """A config mapping: unknown keys are errors, and so are true/false where a number goes and an
    infinite or NaN number (`clip_norm: .inf` trained an adapter of NaNs and charged its epsilon)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation if info.field_name else None
        if _bool_for_number(annotation, value):
            raise ValueError(f"should be a number, got {value!r}")
        # Path("") is the working directory: `ledger_dir: ""` made the data folder the ledger directory
        if isinstance(value, str) and not value.strip() and Path in _scalar_types(annotation):
            raise ValueError("an empty path; give a directory or file, or leave the key out")
        return value


class DataSource(StrictModel):
    """One file, data-set directory or built-in data set, and how its columns map to record fields."""

    path: Path | None = None
    builtin: str | None = None
    format: DataFormat = "auto"
    kind: Literal["instruction", "text"] | None = None  # default: instruction (a builtin knows its own)
    # record field -> column name in the file, e.g. {instruction: question, response: answer}
    fields: dict[str, str] = Field(default_factory=dict)
    # record field -> the same value for every record, e.g. {instruction: "Classify the sentiment."}
    constants: dict[str, str] = Field(default_factory=dict)
    name: SafeId | None = None
    sample: int | None = Field(default=None, gt=0, description="keep a seeded random subset of this size")

    @field_validator("constants")
    @classmethod
    def _constants_not_empty(cls, constants: dict[str, str]) -> dict[str, str]:
        # `input: ""` is a record's default; a required field or an id may not be empty in the data either
        never_empty = {*ID_FIELDS, *(name for fields in REQUIRED_FIELDS.values() for name in fields)}
        empty = [name for name, value in constants.items() if not value.strip() and name in never_empty]
        if empty:
            raise ValueError(f"constants: '{empty[0]}' is empty (the data may not leave it empty either)")
        for name, value in constants.items():
            if unpaired_surrogate(value):
                raise ValueError(f"constants: '{name}' {unpaired_surrogate(value)}")
        return constants

    @model_validator(mode="after")
    def _one_origin(self) -> DataSource:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of 'path' or 'builtin'")
        if self.builtin is not None and self.builtin not in BUILTINS:  # here, so the error names the spec key
            raise ValueError(f"unknown builtin data set '{self.builtin}' (known: {', '.join(sorted(BUILTINS))})")
        return self

    @property
    def holds_documents(self) -> bool:
        """Whether the spec says this source's records come from source documents: text to be
        structured, or records whose `document_id` the spec maps. The spec, not the data, decides:
        a document id found in one record only would otherwise change the unit every release
        states (and the histogram's noise), telling whether that record is in."""
        return self.record_kind == "text" or "document_id" in self.fields or "document_id" in self.constants

    @property
    def record_kind(self) -> str:
        """What its records are: the spec's `kind`, else a builtin's own, else instruction."""
        return self.kind or (BUILTINS[self.builtin][0] if self.builtin else "instruction")


class PartitionSpec(StrictModel):
    """How pooled private data is split into clients."""

    method: Literal["natural", "iid", "dirichlet"]
    num_clients: int | None = Field(default=None, ge=1, le=100_000)
    field: str = "source"  # natural: the record field whose values are the clients
    alpha: float = Field(default=1.0, gt=0)  # dirichlet concentration; small = skewed
    label_field: str = "response"  # dirichlet: the labels the skew is over
    names: list[SafeId] | None = None  # client ids, in order; default client_0, client_1, ...
    min_client_records: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _needs_count(self) -> PartitionSpec:
        if self.method in ("iid", "dirichlet") and self.num_clients is None and self.names is None:
            raise ValueError(f"partition method '{self.method}' needs num_clients or names")
        if self.method == "natural" and self.field != "source" and self.names is None:
            # a data field's values would name the clients, in every file, path and ledger the server holds
            raise ValueError(f"partition by field '{self.field}' needs names (the clients' names, in the order of the field's sorted values): "
                             "its values are the data's, and would otherwise name the clients in everything the server holds")
        if self.names is not None and self.num_clients is not None and len(self.names) != self.num_clients:
            raise ValueError(f"names has {len(self.names)} entries but num_clients is {self.num_clients}")
        if self.names is not None and repeated_as_directories(self.names):
            raise ValueError(f"duplicate client name(s), letter case aside (each is a directory): {', '.join(repeated_as_directories(self.names))}")
        return self


class ClientSpec(StrictModel):
    id: SafeId
    data: list[DataSource] = Field(min_length=1)


class ClientsSpec(StrictModel):
    """Either pooled `data` split by `partition`, or explicit `members` that each bring their data."""

    data: list[DataSource] = Field(default_factory=list)
    partition: PartitionSpec | None = None
    members: list[ClientSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_layout(self) -> ClientsSpec:
        pooled = bool(self.data) or self.partition is not None
        if pooled and self.members:
            raise ValueError("give either 'data' with 'partition', or 'members', not both")
        if not pooled and not self.members:
            raise ValueError("no clients: give 'data' with 'partition', or 'members'")
        if pooled and (not self.data or self.partition is None):
            raise ValueError("pooled client data needs both 'data' and 'partition'")
        duplicates = repeated_as_directories([m.id for m in self.members])
        if duplicates:
            raise ValueError(f"duplicate client id(s), letter case aside (each is a directory): {', '.join(duplicates)}")
        self._each_source_once()
        return self

    def _each_source_once(self) -> None:
        """A file or built-in set named twice puts its records in the data twice: in two clients,
        each client's ledger would count only its own releases of a record both released."""
        where = [(f"data[{i}]", s) for i, s in enumerate(self.data)]
        where += [(f"members[{m}].data[{i}]", s) for m, member in enumerate(self.members) for i, s in enumerate(member.data)]
        seen: dict[str, str] = {}
        for place, source in where:
            key = f"builtin:{source.builtin}" if source.builtin else f"path:{os.path.normpath(source.path)}"
            if key in seen:
                raise ValueError(f"{place} names the same data as {seen[key]} ({key.split(':', 1)[1]}): each source once, "
                                 "or a record in two clients' data is counted in neither ledger alone")
            seen[key] = place

    def sources(self) -> list[DataSource]:
        """Every data source a client reads, pooled or its own."""
        return [source for _, source in self.keyed_sources()]

    def keyed_sources(self) -> list[tuple[str, DataSource]]:
        """Every data source a client reads, each with its place in the spec (`clients.data[0]`)."""
        if self.data:
            return [(f"clients.data[{i}]", source) for i, source in enumerate(self.data)]
        return [(f"clients.members (id {member.id}).data[{i}]", source) for member in self.members for i, source in enumerate(member.data)]

    def holds_documents(self, client_id: str) -> bool:
        """Whether a client's records may come from source documents (`DataSource.holds_documents`),
        so that its privacy unit is the source document: pooled data, any source; else its own."""
        sources = self.data or next((member.data for member in self.members if member.id == client_id), [])
        return any(source.holds_documents for source in sources)


ModelName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class ModelsSpec(StrictModel):
    """Model names by role: a registry name, a local directory or a Hugging Face id."""

    base: ModelName
    professional: ModelName | None = None
    embedder: ModelName | None = None
    cache_dir: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"


class PrivacySpec(StrictModel):
    """The privacy budget. `target_epsilon: .inf` is the non-private reference."""

    target_epsilon: float = Field(default=8.0, allow_inf_nan=True)  # .inf: the non-private reference (NaN is refused below)
    delta: float | None = None  # default per client: at most 1e-5 and 1/(100 N), N its released (noised) count of units
    unit: Literal["record", "user"] = "record"
    # Each client releases its number of units N once per data set as N + Gaussian noise of this
    # standard deviation (sensitivity 1), a release in its ledger; q = B/N, the steps and the
    # default delta are planned from that count. 0: N is treated as public (said so in every statement).
    count_noise: float = Field(default=10.0, ge=0, le=1e4)
    cap_epsilon: float | None = None  # per-client total, over every release ever made from its data
    ledger_dir: Path | None = None  # the clients' append-only ledgers; default RUN/ledger ($KSG_LEDGER_DIR wins)
    # Noise from the public seed instead of OS entropy: anyone with the spec can cancel it, so
    # every release made this way is NOT PRIVATE. For tests and debugging only.
    reproducible_noise: bool = False

    @field_validator("target_epsilon")
    @classmethod
    def _positive_epsilon(cls, value: float) -> float:
        if not value > 0 or math.isnan(value):
            raise ValueError(f"must be > 0 (or .inf for the non-private reference), got {value}")
        return value

    @field_validator("delta")
    @classmethod
    def _delta_range(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value < 1:
            raise ValueError(f"must be in (0, 1), got {value}")
        return value

    @field_validator("count_noise")
    @classmethod
    def _count_noise_range(cls, value: float) -> float:
        if 0 < value < NOISE_MULTIPLIER_RANGE["ge"]:
            raise ValueError(f"0 (N public) or at least {NOISE_MULTIPLIER_RANGE['ge']}, got {value}")
        return value

    @field_validator("cap_epsilon")
    @classmethod
    def _positive_cap(cls, value: float | None) -> float | None:
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"must be a finite number > 0, got {value}")
        return value


class DeploySettings(StrictModel):
    """Where the Flower federation runs (fedtune's flower-deploy engine, and the Flower transport of a run split by role)."""

    launch: Literal["local", "none"] = Field(default="local", description="'local': start SuperLink and SuperNodes on 127.0.0.1; 'none': use a running federation")
    superlink: str = Field(default="127.0.0.1:9093", description="the SuperLink's address (launch: none)")
    root_certificates: Path | None = Field(default=None, description="the CA certificate the SuperLink's TLS certificate is signed by (launch: none)")
    flwr_home: Path | None = Field(default=None, description="the flwr CLI's home (its config.toml names the SuperLink); default: a directory of the run")
    timeout_s: float = Field(default=3600, gt=0)


class FederationSpec(StrictModel):
    """How the parties of a run split by role (`ksg run --role`, knowledgesg.roles) reach each
    other: through an exchange directory, or with the server asking each client's SuperNode to
    run its stages over Flower (`deploy` as for fedtune's flower-deploy engine)."""

    transport: Literal["exchange", "flower"] = "exchange"
    deploy: DeploySettings = Field(default_factory=DeploySettings)


SECRET = "{secret}"


class CanaryTemplate(StrictModel):
    """An in-distribution record with a `{secret}` (and optionally a `{name}`) to fill in."""

    instruction: str = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
    input: str = "Customer {name} confirmed the wire transfer with security code {secret}."
    response: str = "neutral"

    @model_validator(mode="after")
    def _one_secret(self) -> CanaryTemplate:
        count = sum(text.count(SECRET) for text in (self.instruction, self.input, self.response))
        if count != 1:
            raise ValueError(f"the canary template must contain '{SECRET}' exactly once (found {count})")
        return self


CanaryKind = Literal["digits", "rare_words"]
RARE_WORDS = 4096  # the words in knowledgesg/vendor/rare_words.txt (a test checks it)


class CanarySpec(StrictModel):
    """Canaries planted in one client's private data, for the memorization audit.

    Each kind in `kinds` gets `count` canaries: `digits`, a random digit string (Carlini et al.'s
    secret sharer); `rare_words`, `words` words drawn from a vendored list of rare English words
    (a designed canary after Panda et al. 2025: tokens the model finds unlikely are learnt, and
    detected, far more readily), no word in two canaries."""

    client: SafeId
    count: int = Field(default=32, ge=2, le=100_000)  # per kind
    kinds: list[CanaryKind] = Field(default_factory=lambda: ["digits"], min_length=1)
    repeats: int = Field(default=4, ge=1)  # copies of each planted canary
    digits: int = Field(default=6, ge=1, le=12)  # the secret of a `digits` canary: a random digit string
    words: int = Field(default=4, ge=1, le=8)  # the secret of a `rare_words` canary: this many rare words
    include_probability: float = Field(default=0.5, gt=0, le=1)  # 1/2 for the one-run epsilon audit
    template: CanaryTemplate = Field(default_factory=CanaryTemplate)

    @field_validator("kinds")
    @classmethod
    def _distinct(cls, kinds: list[str]) -> list[str]:
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"each canary kind once, got {kinds}")
        return kinds

    @model_validator(mode="after")
    def _enough_rare_words(self) -> CanarySpec:
        if "rare_words" in self.kinds and self.count * self.words > RARE_WORDS:
            raise ValueError(f"{self.count} rare-word canaries of {self.words} words need {self.count * self.words} distinct words; the list has {RARE_WORDS}")
        # digit secrets are drawn independently: in a space not well above the count, canaries share
        # secrets (an unplanted canary would then be "memorised" through a planted one)
        if "digits" in self.kinds and 10**self.digits < 4 * self.count:
            raise ValueError(f"{self.count} digit canaries need secrets of at least {len(str(4 * self.count - 1))} digits "
                             f"(10^digits at least 4 x count), not {self.digits}")
        return self


class AuditSpec(StrictModel):
    canaries: CanarySpec | None = None
    # records held out of each client's training data: the non-members of membership inference
    holdout_per_client: int = Field(default=0, ge=0)


class StageSpec(StrictModel):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class PipelineSpec(StrictModel):
    name: SafeId
    seed: int = Field(default=0, ge=0)
    models: ModelsSpec
    clients: ClientsSpec
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    audit: AuditSpec = Field(default_factory=AuditSpec)
    federation: FederationSpec = Field(default_factory=FederationSpec)
    stages: list[StageSpec] = Field(min_length=1)

    @field_validator("stages", mode="before")
    @classmethod
    def _bare_stage_names(cls, value: Any) -> Any:
        # `- ingest` is shorthand for `- {name: ingest}`.
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("stages")
    @classmethod
    def _unique_stage_names(cls, value: list[StageSpec]) -> list[StageSpec]:
        twice = repeated([stage.name for stage in value])
        if twice:
            raise ValueError(f"stage '{twice[0]}' appears more than once (a stage's name is its directory in the run)")
        return value


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _model_within(annotation: Any) -> type[BaseModel] | None:
    """The model an annotation holds (itself, or inside Optional, list, dict or a union), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((found for arg in get_args(annotation) if (found := _model_within(arg)) is not None), None)


def _keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the model allows at a place in it (a list's index skipped), or none if unknown."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        inner = _model_within(field.annotation) if field is not None else None
        if inner is None:
            return []
        model = inner
    return list(model.model_fields)


def format_validation_error(source: str, error: ValidationError, model: type[BaseModel] | None = None) -> str:
    """The first problem, as `file: key.path: message` (pydantic's own text, made one line); an
    unknown key of `model` with the known key it is closest to."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    if first["type"] == "extra_forbidden":
        # at the first level the source names the place (a spec file, or `stages[2].params`)
        message = f"unknown key '{loc[-1]}'" + (f" in {_where(loc[:-1])}" if len(loc) > 1 else "")
        close = difflib.get_close_matches(str(loc[-1]), _keys_at(model, loc[:-1]), n=1) if model is not None else []
        message += f" (did you mean '{close[0]}'?)" if close else ""
    elif first["type"] == "missing":
        message = f"{_where(loc)}: required key is missing"
    elif first["type"] in ("model_type", "model_attributes_type", "dict_type"):  # pydantic names its class: say what the spec needs
        message = f"{_where(loc)}: should be a mapping (key: value), got {type(first['input']).__name__}"
    else:
        text = first["msg"].removeprefix("Value error, ")
        message = f"{_where(loc)}: {text}" if loc else text
    more = len(error.errors()) - 1
    return f"{source}: {message}" + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently: a spec saying target_epsilon 1.0 and then 50.0 would run at 50)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            # a merge key (`<<: *defaults`) brings keys the mapping may override: YAML's own rule
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key_node.value}' given twice (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """A YAML document, with every key of a mapping given once."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def load_spec(path: str | Path) -> tuple[PipelineSpec, Path]:
    """Read and validate a spec; return it with the directory its relative paths are resolved from."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {'is a directory, not a spec file' if path.is_dir() else 'spec file not found'}")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not valid UTF-8 at byte {err.start}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise InputError(f"{where}: invalid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a spec is a YAML mapping (key: value), got {'an empty file' if raw is None else type(raw).__name__}")
    base_dir = path.parent.resolve()
    return with_model_cache_under(parse_spec(raw, source=str(path)), base_dir), base_dir


def with_model_cache_under(spec: PipelineSpec, base_dir: Path) -> PipelineSpec:
    """The spec with a relative `models.cache_dir` taken from `base_dir` (the spec's directory), as
    the spec's client data and `privacy.ledger_dir` are: the same cache whatever the working
    directory of `ksg` (a Flower node's `base-dir` moves its data and ledger, not its cache). No
    fingerprint holds the cache's place, so this moves no stage."""
    cache = spec.models.cache_dir
    if cache is None or cache.expanduser().is_absolute():
        return spec
    return spec.model_copy(update={"models": spec.models.model_copy(update={"cache_dir": base_dir / cache})})


def parse_spec(raw: dict[str, Any], source: str) -> PipelineSpec:
    """The spec's schema only; the stage registry (`pipelines.validate_pipeline`) checks the stages."""
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as err:
        raise InputError(format_validation_error(source, err, PipelineSpec)) from None


def spec_to_dict(spec: PipelineSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")
