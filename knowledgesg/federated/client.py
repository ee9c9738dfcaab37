"""A client's side of `fedtune`: local LoRA training from the global adapter, one round at a time.

The same `fit` runs in every engine. On synthetic (public) data everything random in a round is
seeded from (job seed, client, round), so a round replays exactly and the engines agree. Local
rules:
- FedProx adds mu/2 ||w - x||^2 (x: the received adapter) to the loss.
- SCAFFOLD (option II of Karimireddy et al.) corrects each SGD gradient by (c - c_i) and then sets
  c_i+ = c_i - c + (x - y) / (K lr); the client keeps c_i between rounds.
- Private data is trained on with DP-SGD only (Opacus, via privacy.dp_sgd): Poisson-sampled
  batches at the planned rate, `steps` noisy steps per round, coins and noise from the client's
  own OS entropy. Before the update leaves, the client checks its accountant against the plan
  and its own budget cap, and enters the release in its own ledger. Its loss and example count
  stay in a client-side log (`stages/fedtune/clients/<id>/local_log.jsonl`).
- Client-level DP-FedAvg: the client draws its own participation coin and clips its whole update
  before sending it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from eval.canaries import unplanted_canary_units
from knowledgesg.adapters import with_lora
from knowledgesg.aggregation import clip_update
from knowledgesg.errors import InputError, KsgError
from knowledgesg.federated.protocol import ClientTask, ClientUpdate, LocalDP, LocalTraining, LoraShape, Params, encode_update
from knowledgesg.fileio import read_json, read_jsonl, sha256_text
from knowledgesg.models import REGISTRY, TINY, Precision, ResolvedModel, load_causal_lm, resolve_model, resolve_precision
from knowledgesg.records import InstructionRecord
from knowledgesg.runner import SPEC_COPY, load_run_role, load_run_spec
from knowledgesg.spec import ClientsSpec, load_spec
from privacy.accounting import Mechanism, default_delta, epsilons
from privacy.ledger import LEDGER_ENV, ROUND_ARTIFACT, ClientLedger, LedgerEntry, as_sent, check_budget, client_delta, ledger_directory, new_release_id, now, trust_line
from privacy.noise import SecureRandom
from privacy.units import privacy_units

LOCAL_LOG = "local_log.jsonl"


def task_seed(task: ClientTask, purpose: str) -> int:
    return int(sha256_text(f"{task.seed}:fedtune:{task.client_id}:{task.round}:{purpose}")[:15], 16)


class LoraModel:
    """The base model with a LoRA adapter, loaded once per process and reused every round."""

    _cache: dict[tuple, LoraModel] = {}

    def __init__(self, base_model: dict, lora: LoraShape, device: str, precision: Precision = "float32") -> None:
        # the frozen weights only: peft keeps the adapter float32 over a bfloat16 base
        model, self.tokenizer = load_causal_lm(ResolvedModel(**base_model), device, resolve_precision(precision, device), training=True)
        self.model = with_lora(model, lora.r, lora.alpha, lora.target_modules, "fedtune params.lora.target_modules")
        self.device = device
        if lora.ffa:  # every party draws the same A from the public seed and never trains it
            reset_lora(self.model, lora.a_seed)
            for name, p in self.model.named_parameters():
                if "lora_A" in name:
                    p.requires_grad_(False)
            if lora.a_sha256 is not None and frozen_a_digest(self.model) != lora.a_sha256:
                # another torch, peft or device can draw another A from the same seed
                raise KsgError("FFA-LoRA: this party's A (from a_seed) differs from the server's; the same torch and peft versions are needed on every party")

    @classmethod
    def get(cls, base_model: dict, lora: LoraShape, device: str, precision: Precision = "float32") -> LoraModel:
        key = (base_model["path"], base_model.get("weights_sha256"), lora.model_dump_json(), device, precision)
        if key not in cls._cache:
            cls._cache.clear()  # one model per process: a new job replaces the old one
            cls._cache[key] = cls(base_model, lora, device, precision)
        return cls._cache[key]

    def trainable(self) -> dict:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def get_params(self) -> Params:
        return {name: p.detach().cpu().numpy().astype(np.float32, copy=True) for name, p in self.trainable().items()}

    def set_params(self, params: Params) -> None:
        import torch

        trainable = self.trainable()
        if set(trainable) != set(params):
            raise KsgError(f"adapter parameters do not match the model's LoRA layout ({len(params)} received, {len(trainable)} expected)")
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(torch.from_numpy(params[name]).to(p.device))


def frozen_a_digest(model) -> str:
    """sha256 over the LoRA A matrices, in name order."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        if "lora_A" in name:
            digest.update(name.encode() + p.detach().cpu().numpy().astype(np.float32).tobytes())
    return digest.hexdigest()


def reset_lora(model, seed: int | None = None) -> None:
    """LoRA's own initialisation (A random, B zero), drawn from `seed` (None: torch's stream as it is)."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_lora_parameters"):
            module.reset_lora_parameters("default", True)


def initial_params(base_model: dict, lora: LoraShape, seed: int, device: str = "cpu") -> Params:
    """The global adapter before round 1: LoRA's own initialisation, seeded (with FFA-LoRA, B only:
    A is every party's own copy from `lora.a_seed`)."""
    import torch

    LoraModel._cache.clear()
    if lora.ffa:
        return LoraModel.get(base_model, lora, device).get_params()  # B zero; A drawn from a_seed as the model was built
    torch.manual_seed(seed)
    lora_model = LoraModel.get(base_model, lora, device)
    reset_lora(lora_model.model)
    return lora_model.get_params()


def joins_round(task: ClientTask) -> bool:
    """Client-level DP: this client's own participation coin for the round (OS entropy: neither
    the server nor anyone with the spec can predict it)."""
    if task.join_probability is None:
        return True
    return SecureRandom.for_release(task.reproducible_coins, task.seed, "fedtune-join", task.client_id, task.round).coin(task.join_probability)


def update_digest(update: Params) -> str:
    digest = hashlib.sha256()
    for name in sorted(update):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(update[name], dtype=np.float32).tobytes())
    return digest.hexdigest()


def round_mechanism(dp: LocalDP, steps: int) -> Mechanism:
    return Mechanism(kind="poisson_gaussian", noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate, steps=steps)


def within_cap(task: ClientTask, mechanism: Mechanism, before: list[LedgerEntry]) -> None:
    """The client's cap over every release its data made (`before`) and this round's."""
    dp = task.local_dp
    check_budget(before, task.client_id, [mechanism], dp.delta, dp.cap_epsilon, f"fedtune round {task.round}", dp.unit)


def check_document_units(task: ClientTask, clients: ClientsSpec, whose: str) -> bool:
    """Whether the client's records form source-document units as a spec of its own says; a task
    naming a client that spec does not have, or planning the other unit, is refused."""
    if clients.members and task.client_id not in [m.id for m in clients.members]:
        raise KsgError(f"client '{task.client_id}': not a client of {whose} (it names {', '.join(m.id for m in clients.members)}): refused")
    own = clients.holds_documents(task.client_id)
    if own != task.local_dp.documents:
        raise KsgError(f"client '{task.client_id}': the server's plan counts privacy per {'source document' if task.local_dp.documents else 'record'}, "
                       f"{whose} per {'source document' if own else 'record'}: refused")
    return own


@dataclass(frozen=True)
class NodeSettings:
    """What a data owner's SuperNode decides for itself, whatever a task from the server says (its
    node config, `flower-supernode --node-config`): where its ledger is, its own budget cap, and
    whether its noise may come from the public seed. The server's task plans the mechanism only: a
    server that asked for reproducible noise could regenerate it and subtract it from the update."""

    ledger_dir: str
    cap_epsilon: float | None = None
    reproducible_noise: bool = False
    # which client the node is (`client-id`): a task naming another is refused. The ledger counts
    # a client's releases under its name, so a server that renamed the node's client ("BANK_A",
    # one directory on a case-blind file system) would otherwise start it on a fresh budget
    client_id: str | None = None
    # the delta and privacy unit the data owner allows (node config `delta`, `unit`, else its
    # spec's privacy section): at a larger delta the same noise claims a smaller epsilon, and
    # record-level units understate a user's cost, so a server could otherwise pass the cap
    delta: float | None = None
    unit: str | None = None
    # the node's own model cache (node config `model-cache`, else its spec's models.cache_dir, else
    # $KSG_CACHE_DIR or ~/.cache/knowledgesg): the server's task names a path on the server's machine
    model_cache: str | None = None
    # the node's own spec's clients section (node config `spec`): the privacy unit its data is
    # counted in, source document or record, which a server's task may not change
    clients: ClientsSpec | None = None
    # the base model its spec names and the directory its relative paths resolve from: outside the
    # registry, the only model it trains on private data (its own copy), since a model the server
    # chose could break what DP-SGD assumes (one unit per row of the batch)
    base_model: str | None = None
    base_dir: str | None = None
    # the local training its own spec's fedtune stage plans: a private round may not do more work
    # (steps, expected batch, tokens per row). How long a round takes depends on the records it
    # reads, and the server sees that time; a server free to ask for q = 1 and huge noise would
    # pay almost no epsilon and time every record, every step, to learn N or a record's presence
    training: LocalTraining | None = None

    @classmethod
    def of(cls, node_config: dict) -> NodeSettings:
        """From the node config: `ledger-dir`, `cap-epsilon`, `reproducible-noise` (true only for
        trials: NOT PRIVATE); where one is not set, the node's own spec (its privacy section, as
        its ingest and dp_train read it: the same ledger): the config's `spec`, else the spec copy
        its `run-dir` holds (the one its ingest ran with); without either, $KSG_LEDGER_DIR or
        RUN/ledger, no cap, noise from OS entropy."""
        run_dir = Path(str(node_config["run-dir"]))
        spec, base_dir = None, run_dir
        if node_config.get("spec"):
            spec, base_dir = load_spec(str(node_config["spec"]))
        elif (run_dir / SPEC_COPY).is_file():
            spec, base_dir = load_run_spec(run_dir)
        base_dir = Path(str(node_config.get("base-dir", base_dir)))
        privacy, spec_cache = (spec.privacy, spec.models.cache_dir) if spec else (None, None)
        ledger = node_config.get("ledger-dir") or ledger_directory(privacy.ledger_dir if privacy else None, base_dir, run_dir)
        cap = node_config.get("cap-epsilon", privacy.cap_epsilon if privacy else None)
        # the node config's own word wins either way: `reproducible-noise=false` overrules a spec's true
        reproducible = str(node_config["reproducible-noise"]).lower() == "true" if "reproducible-noise" in node_config else bool(privacy and privacy.reproducible_noise)
        # else the client its run directory was made for (`ksg run --role client --client ID`): a
        # node with neither took the server's word for whose ledger a round counts in
        client = node_config.get("client-id") or (load_run_role(run_dir).client if (run_dir / SPEC_COPY).is_file() else None)
        delta = node_config.get("delta", privacy.delta if privacy else None)
        unit = node_config.get("unit", privacy.unit if privacy else None)
        cache = node_config.get("model-cache") or spec_cache
        fedtune = next((stage for stage in spec.stages if stage.name == "fedtune"), None) if spec else None
        training = LocalTraining.model_validate(fedtune.params.get("training") or {}) if fedtune else None
        return cls(str(ledger), float(cap) if cap is not None else None, reproducible, str(client) if client is not None else None,
                   float(delta) if delta is not None else None, str(unit) if unit is not None else None, str(cache) if cache is not None else None,
                   spec.clients if spec else None, spec.models.base if spec else None, str(base_dir) if spec else None, training)

    def govern(self, task: ClientTask) -> ClientTask:
        """The task with the node's own settings; refused if the server asks for reproducible noise
        or coins the node does not allow, or names another client. A cap from the server may tighten
        the node's, never loosen it."""
        if self.client_id is not None and task.client_id != self.client_id:
            raise KsgError(f"this node is client '{self.client_id}', and the server's task names '{task.client_id}': refused")
        if (task.reproducible_coins or (task.local_dp is not None and task.local_dp.reproducible_noise)) and not self.reproducible_noise:
            raise KsgError(f"client '{task.client_id}': the server asks for noise from the public seed (NOT PRIVATE), which this node's config does not allow (reproducible-noise)")
        if task.private_source not in (None, "ingest"):  # fedtune reads ingest's records; nothing else is the server's to name
            raise KsgError(f"client '{task.client_id}': the server asks for records of stage '{task.private_source}'; a fedtune client reads ingest's: refused")
        if task.local_dp is None:
            return task
        if self.unit is not None and task.local_dp.unit != self.unit:
            raise KsgError(f"client '{task.client_id}': the server's plan counts privacy per {task.local_dp.unit}, this node's privacy unit is the {self.unit} (unit): refused")
        if self.clients is not None:
            check_document_units(task, self.clients, "this node's spec")
        if self.training is not None:
            self.refuse_more_work(task)
        caps = [c for c in (self.cap_epsilon, task.local_dp.cap_epsilon) if c is not None]
        local_dp = task.local_dp.model_copy(update={"ledger_dir": self.ledger_dir, "cap_epsilon": min(caps) if caps else None, "reproducible_noise": self.reproducible_noise})
        return task.model_copy(update={"local_dp": local_dp, "reproducible_coins": self.reproducible_noise and task.reproducible_coins})

    def refuse_more_work(self, task: ClientTask) -> None:
        """A private round with more steps, a larger expected Poisson batch (q N) or longer rows than
        this node's spec plans is refused before it reads a record (see `training`)."""
        own, asked, dp = self.training, task.training, task.local_dp
        assert own is not None and dp is not None
        expected = dp.sample_rate * dp.num_units
        if asked.steps > own.steps or asked.max_length > own.max_length or asked.batch_size > own.batch_size or expected > own.batch_size * (1 + 1e-9):
            raise KsgError(f"client '{task.client_id}': the server asks for {asked.steps} local steps over {expected:.4g} units expected a step (q {dp.sample_rate:.4g}) "
                           f"of up to {asked.max_length} tokens, more work on the private records than this node's spec plans ({own.steps} steps, "
                           f"batch {own.batch_size}, max_length {own.max_length}): refused (the time a round takes depends on the records it reads)")

    def own_base_model(self, task: ClientTask) -> ClientTask:
        """The task with the base model as this node has it: a packaged model from the node's own
        model cache by its name (the server's path is a place on the server's machine), refused if
        its weights are not the ones the server trains (updates of other weights would not average).
        Any other model (a local directory, a Hugging Face id) it trains on private data only where
        its own spec names it, and then as this node has it; on public data, as the server names it."""
        server = task.base_model
        if server["name"] not in REGISTRY and server["name"] != TINY:
            if task.local_dp is None:
                return task
            if self.base_model != server["name"]:
                raise KsgError(f"client '{task.client_id}': the server's base model '{server['name']}' is not a packaged model nor the one this node's spec names "
                               f"({self.base_model or 'no spec'}): refused (a model the data owner has not chosen may break per-unit clipping)")
            own = resolve_model(self.base_model, Path(self.model_cache) if self.model_cache else None, Path(self.base_dir) if self.base_dir else None)
            if server.get("weights_sha256") and own.weights_sha256 != server["weights_sha256"]:  # none: not the weights the server has
                raise KsgError(f"client '{task.client_id}': this node's {own.name} weights (sha256 {(own.weights_sha256 or 'none found')[:12]}) are not the server's "
                               f"({server['weights_sha256'][:12]}): refused")
            return task.model_copy(update={"base_model": asdict(own)})
        own = resolve_model(server["name"], Path(self.model_cache) if self.model_cache else None)
        if own.weights_sha256 != server.get("weights_sha256"):  # the server's own copy of a packaged model always has its digest
            raise KsgError(f"client '{task.client_id}': this node's {own.name} weights (sha256 {own.weights_sha256[:12]}) are not the server's "
                           f"({(server.get('weights_sha256') or 'none given')[:12]}): refused")
        return task.model_copy(update={"base_model": asdict(own)})

    def check_delta(self, task: ClientTask, num_units: int, earlier: list[LedgerEntry]) -> None:
        """The plan's delta as this data owner allows it, before any training: at most the node's
        own (node config, else its spec), else the delta its ledger is kept at (its latest
        release's, which the server plans with), else the default for its own N; and below 1/N.
        At a larger delta the same noise claims a smaller epsilon, and the cap is easier to pass."""
        delta = task.local_dp.delta
        if self.delta is not None:
            ceiling, whose = self.delta, "this node's delta"
        elif earlier:
            ceiling, whose = client_delta(earlier), "the delta of this client's ledger"
        else:
            ceiling, whose = default_delta(num_units), f"the default delta for its {num_units} {task.local_dp.unit}s"
        if delta > ceiling:
            raise KsgError(f"client '{task.client_id}': the server plans delta {delta:g}, above {whose}, {ceiling:g}: refused")
        if not delta < 1.0 / num_units:
            raise KsgError(f"client '{task.client_id}': the server plans delta {delta:g}, not below 1/N = {1.0 / num_units:g} for its {num_units} {task.local_dp.unit}s "
                           "(a mechanism may then publish a unit outright): refused")


def planned_size(storage: Path, client_id: str) -> int | None:
    """The size this client's ingest released for the server to plan with (its noised count, as
    planned); None where its N is public or its ingest kept no count."""
    path = storage / "stages" / "ingest" / "clients" / client_id / "stats.json"
    units = read_json(path).get("units") if path.is_file() else None
    return int(units["planned"]) if units else None


class ClientRuntime:
    """One process's client side: runs tasks, keeps each client's SCAFFOLD control variate."""

    def __init__(self) -> None:
        self.controls: dict[str, Params] = {}

    def fit(self, task: ClientTask, params: Params, server_control: Params | None = None, client_control: Params | None = None,
            node: NodeSettings | None = None) -> ClientUpdate:
        """`node`: the settings of the data owner's SuperNode this runs on (None: the client runs
        in the server's process, a simulation, and the task's settings are the spec's)."""
        if node is not None:
            task = node.own_base_model(node.govern(task))
            if task.local_dp is not None:
                self._privacy_units(task, self._records_to_train(task))  # the plan's N checked against the client's own
                node.check_delta(task, task.local_dp.num_units, self._ledger(task, node).entries())
        if task.local_dp is not None and task.join_probability is not None:
            return self._fit_client_level(task, params, node)
        if not joins_round(task):
            return ClientUpdate(task.client_id, None, None, None)
        records = self._records_to_train(task)
        if task.local_dp is not None:
            # refused before any training: a round refused after it would cost the client time the
            # server can measure (a function of N and of the records' lengths), and nothing in its ledger
            self._check_cap(task, node)
        update, loss, control_delta, dp_steps = self._train(task, params, records, server_control, client_control)
        if task.local_dp is None:
            return ClientUpdate(task.client_id, encode_update(update, task.update_encoding), len(records), loss, control_delta, dp_steps)
        release = self._record_release(task, update, dp_steps, node)
        self._log(task, {"round": task.round, "examples": len(records), "mean_loss": loss, "dp_steps": dp_steps, "release_id": release.release_id})
        return ClientUpdate(task.client_id, encode_update(update, task.update_encoding), None, None, None, dp_steps, as_sent(release))

    def _fit_client_level(self, task: ClientTask, params: Params, node: NodeSettings | None) -> ClientUpdate:
        """Client-level DP on private data: what the server can see must not depend on the client's
        coin. So the checks that can fail (the records, their privacy units, the budget) and the
        round's ledger entry come first, for either outcome: the entry is charged as if the client
        joined, holds no digest of its update, and is written before any training (an entry only for
        the rounds a client joined, or a later one, would show the server whom the coins chose).
        Then the coin, and the training either way: a client that sat out and answered at once would
        show whom the coins chose by the reply's time, secure aggregation or not. One that sits out
        sends no update (zeros under secure aggregation)."""
        records = self._records_to_train(task)
        self._privacy_units(task, records)
        release = self._record_release(task, None, task.training.steps, node)
        joined = joins_round(task)
        update, loss, _, dp_steps = self._train(task, params, records, None, None)
        if not joined:
            self._log(task, {"round": task.round, "joined": False, "release_id": release.release_id})
            return ClientUpdate(task.client_id, None, None, None, None, task.training.steps, as_sent(release))
        self._log(task, {"round": task.round, "joined": True, "examples": len(records), "mean_loss": loss, "dp_steps": dp_steps, "release_id": release.release_id})
        return ClientUpdate(task.client_id, encode_update(update, task.update_encoding), None, None, None, dp_steps, as_sent(release))

    def _records_to_train(self, task: ClientTask) -> list[InstructionRecord]:
        records = self.records(task)
        if not records:
            raise InputError(f"client '{task.client_id}': no training records for round {task.round}")
        return records

    def _train(self, task: ClientTask, params: Params, records: list[InstructionRecord], server_control: Params | None,
               client_control: Params | None) -> tuple[Params, float | None, Params | None, int]:
        """(the update, clipped if the task says so; mean loss; SCAFFOLD's control delta; DP-SGD steps)."""
        import torch

        from knowledgesg.sft import tokenize_example  # imports torch and opacus: not when `ksg` starts

        lora = LoraModel.get(task.base_model, task.lora, task.device, task.training.precision)
        lora.set_params(params)
        torch.manual_seed(task_seed(task, "torch"))
        examples = [tokenize_example(lora.tokenizer, r, task.training.max_length, task.training.loss_on) for r in records]
        if task.local_dp is not None:
            loss, dp_steps = self._fit_dp(task, lora, examples, records)
            control_delta = None
        else:
            control = client_control if client_control is not None else self.controls.get(task.client_id)
            loss, control_delta = self._fit_plain(task, lora, examples, params, server_control, control)
            dp_steps = 0
        trained = lora.get_params()
        update = {name: trained[name] - params[name] for name in params}
        if task.update_clip_norm is not None:
            update = clip_update(update, task.update_clip_norm)
        return update, loss, control_delta, dp_steps

    def records(self, task: ClientTask) -> list[InstructionRecord]:
        if task.records is not None:
            return [InstructionRecord.model_validate({k: v for k, v in r.items() if k != "provenance"}) for r in task.records]
        path = self.storage(task) / "stages" / task.private_source / "clients" / task.client_id / "records.jsonl"
        if not path.is_file():
            raise InputError(f"client '{task.client_id}': private records not found at {path}")
        return [InstructionRecord.model_validate(r) for r in read_jsonl(path) if r.get("kind") == "instruction"]

    @staticmethod
    def storage(task: ClientTask) -> Path:
        return Path(task.run_dir or ".")

    def _documents(self, task: ClientTask) -> bool:
        """Whether this client's records form source-document units, as its own run's spec says
        (the server's plan does not decide a data owner's unit: a task that disagrees is refused).
        Without a spec copy in its storage, the task's, which a node's own spec (`govern`) checked."""
        if not (self.storage(task) / SPEC_COPY).is_file():
            return task.local_dp.documents
        return check_document_units(task, load_run_spec(self.storage(task))[0].clients, f"the run in {self.storage(task)}")

    def _ledger(self, task: ClientTask, node: NodeSettings | None) -> ClientLedger:
        storage = self.storage(task)
        key = read_json(storage / "stages" / "ingest" / "clients" / task.client_id / "ledger_key.json")["data_key"]
        directory = node.ledger_dir if node is not None else os.environ.get(LEDGER_ENV) or task.local_dp.ledger_dir or str(storage / "ledger")
        return ClientLedger.of_data(Path(directory), key, task.client_id)

    def _record_release(self, task: ClientTask, update: Params | None, dp_steps: int, node: NodeSettings | None) -> LedgerEntry:
        """The client's own check and record, before its update leaves: its cap over everything
        its data ever released, then the ledger entry, fsynced. With client-level DP the entry holds
        no digest of the update: the server (without it, under secure aggregation) would learn from
        the digest which clients sent zeros."""
        dp: LocalDP = task.local_dp
        origin = "reproducible" if dp.reproducible_noise else "os_entropy"
        mechanism = round_mechanism(dp, dp_steps)
        entry = LedgerEntry(release_id=new_release_id(), client_id=task.client_id, stage="fedtune",
                            release=f"fedtune round {task.round} update: DP-SGD local steps on private data",
                            artifact=f"stages/fedtune/rounds.json{ROUND_ARTIFACT}{task.round}", artifact_sha256=update_digest(update) if task.join_probability is None else None,
                            run_dir=str(self.storage(task).resolve()), released_at=now(), unit=dp.unit, num_units=dp.num_units, delta=dp.delta,
                            mechanism=mechanism, epsilon=epsilons([mechanism], dp.delta), private=origin == "os_entropy", noise=origin,
                            trust=trust_line(origin, mechanism))
        # the cap checked under the ledger's lock: another run may be releasing from the same data
        self._ledger(task, node).append(entry, lambda before: within_cap(task, mechanism, before))
        return entry

    def _check_cap(self, task: ClientTask, node: NodeSettings | None) -> None:
        """The cap over everything this client's data released, with the round's planned steps."""
        within_cap(task, round_mechanism(task.local_dp, task.training.steps), self._ledger(task, node).entries())

    def _log(self, task: ClientTask, row: dict) -> None:
        """Un-noised figures of the client's own training: kept on the client only."""
        path = self.storage(task) / "stages" / "fedtune" / "clients" / task.client_id / LOCAL_LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")

    def _fit_plain(self, task: ClientTask, lora: LoraModel, examples, x: Params, server_c: Params | None, client_c: Params | None) -> tuple[float, Params | None]:
        import torch

        from knowledgesg.sft import collate, make_optimizer, sequence_losses  # imports torch and opacus: not when `ksg` starts

        t = task.training
        params = lora.trainable()
        optimizer = make_optimizer(t.optimizer, t.learning_rate)(params.values())
        anchor = {n: torch.from_numpy(x[n]).to(p.device) for n, p in params.items()}
        correction = None
        if task.scaffold:
            zero = {n: np.zeros_like(v) for n, v in x.items()}
            server_c, client_c = server_c or zero, client_c or zero
            correction = {n: torch.from_numpy(server_c[n] - client_c[n]).to(p.device) for n, p in params.items()}
        rng = np.random.default_rng(task_seed(task, "batches"))
        lora.model.train()
        losses = []
        for _ in range(t.steps):
            batch = collate([examples[i] for i in rng.choice(len(examples), size=min(t.batch_size, len(examples)), replace=False)], lora.tokenizer.pad_token_id)
            loss = sequence_losses(lora.model, batch, lora.device).mean()
            if t.proximal_mu > 0:
                loss = loss + t.proximal_mu / 2 * sum(((p - anchor[n]) ** 2).sum() for n, p in params.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if correction is not None:
                for n, p in params.items():
                    p.grad.add_(correction[n])
            optimizer.step()
            losses.append(float(loss.detach()))
        lora.model.eval()
        control_delta = None
        if task.scaffold:
            y = lora.get_params()
            scale = 1.0 / (t.steps * t.learning_rate)
            new_c = {n: client_c[n] - server_c[n] + (x[n] - y[n]) * scale for n in x}
            control_delta = {n: new_c[n] - client_c[n] for n in x}
            self.controls[task.client_id] = new_c
        return float(np.mean(losses)), control_delta

    def _privacy_units(self, task: ClientTask, records: list[InstructionRecord]):
        """The client's units, once the plan's N is found to be the one this client released (its
        noised count as planned, or its exact N where that is public)."""
        dp = task.local_dp
        units = privacy_units(records, dp.unit, dp.max_records_per_user, self._documents(task))
        released = planned_size(self.storage(task), task.client_id)
        if released is not None and released != dp.num_units:
            raise KsgError(f"client '{task.client_id}': the plan assumed {dp.num_units} privacy units, this client released {released}; refusing to train")
        planned = units.count + self._unplanted_canaries(task)  # a public N: the units, and the audit's canaries not planted
        if released is None and planned != dp.num_units:
            raise KsgError(f"client '{task.client_id}': the plan assumed {dp.num_units} privacy units, this client has {planned}; refusing to train")
        return units

    def _unplanted_canaries(self, task: ClientTask) -> int:
        """The audit's canaries not planted in this client's data, which a public N is planned with
        (`unplanted_canary_units`), as its own run's spec makes them; none without a spec copy."""
        if not (self.storage(task) / SPEC_COPY).is_file():
            return 0
        return unplanted_canary_units(load_run_spec(self.storage(task))[0], task.client_id)

    def _fit_dp(self, task: ClientTask, lora: LoraModel, examples, records: list[InstructionRecord]) -> tuple[float | None, int]:
        from knowledgesg.sft import make_optimizer, unit_batch, unit_loss_on, unit_widths  # imports torch and opacus: not when `ksg` starts
        from privacy.dp_sgd import DPSGD, DPSGDSettings, micro_batches, poisson_batches

        t, dp = task.training, task.local_dp
        units = self._privacy_units(task, records)
        # the update is divided by the expected batch the plan gives (about B), never by one the true N
        # gives: that would scale every released update by a function of N
        expected = dp.sample_rate * dp.num_units
        coins = SecureRandom.for_release(dp.reproducible_noise, task.seed, "fedtune", task.client_id, task.round, "sampler")
        noise = SecureRandom.for_release(dp.reproducible_noise, task.seed, "fedtune", task.client_id, task.round, "noise")
        unit_loss = unit_loss_on(lora.device)
        widths = unit_widths(examples, units.members)

        losses, engine = [], None
        try:
            lora.model.train()
            engine = DPSGD(lora.model, make_optimizer(t.optimizer, t.learning_rate), DPSGDSettings(dp.noise_multiplier, dp.clip_norm, dp.sample_rate, expected), noise)
            for batch_units in poisson_batches(units.count, dp.sample_rate, t.steps, coins):
                loss = engine.step([unit_batch(examples, units.members, mb, lora.tokenizer.pad_token_id) for mb in micro_batches(batch_units, units.rows_per_unit, widths, t.batch_size)], unit_loss)
                if loss is not None:
                    losses.append(loss)
        finally:
            if engine is not None:
                engine.close()  # unwrap: the cached model is reused next round without hooks
            lora.model.eval()
        history = engine.accounted_history()
        counted = sum(n for _, _, n in history)
        if counted != t.steps or any(sigma != dp.noise_multiplier or q != dp.sample_rate for sigma, q, _ in history):
            raise KsgError(f"client '{task.client_id}': the accountant counted {history}, not the planned {t.steps} steps at sigma {dp.noise_multiplier}, q {dp.sample_rate}; refusing to send")
        return (float(np.mean(losses)) if losses else None), counted
