"""Outcome collection: what every (budget, mode) action costs and scores on every query.

``collect`` reasons once per (query, mode) at the largest budget and branches the
forced answer off the cached prefix at every budget (see :mod:`tokenopt.lm.decoding`).
It writes the table folder described in :mod:`tokenopt.table.schema` under ``--out``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokenopt.actions import Mode, build_action_table, parse_budgets, parse_modes
from tokenopt.collect.config import CollectConfig, CollectSummary
from tokenopt.data import Query, load_questions
from tokenopt.features import LM_HIDDEN, HiddenSource, PromptFeatures, check_feature_spec_name
from tokenopt.scoring import exact_match
from tokenopt.table.schema import (
    FEATURES_FILE,
    HIDDEN_COLUMN,
    HIDDEN_METADATA,
    MANIFEST_FILE,
    OUTCOME_SCHEMA,
    OUTCOMES_DIR,
    QUERIES_FILE,
    SCHEMA_VERSION,
    shard_path,
    write_json_atomic,
    write_table_atomic,
)

__all__ = ["add_features", "collect", "collect_shard"]

logger = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _query_seed(seed: int, query_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{query_id}".encode(), digest_size=8).digest(), "big") >> 1


def _queries_table(queries: list[Query], prompt_tokens: dict[str, int]) -> pa.Table:
    columns: dict[str, list[object]] = {
        "id": [q.id for q in queries],
        "split": [q.split for q in queries],
        "question": [q.question for q in queries],
        "answers": [list(q.answers) for q in queries],
        "prompt_tokens": [prompt_tokens.get(q.id, -1) for q in queries],
    }
    extra_keys = sorted({key for q in queries for key in q.extra})
    for key in extra_keys:
        values = [q.extra.get(key) for q in queries]
        scalar = all(v is None or isinstance(v, str | int | float | bool) for v in values)
        kinds = {type(v) for v in values if v is not None}
        if scalar and len(kinds) <= 1:
            columns[key] = values
        else:
            columns[key] = [None if v is None else json.dumps(v) for v in values]
    return pa.table(columns)


def _prepare_data(config: CollectConfig, out: Path) -> Path:
    if config.data is not None:
        return Path(config.data)
    from tokenopt.demo.suite import generate_suite, write_jsonl

    path = out / "questions.jsonl"
    if not path.exists():
        write_jsonl(generate_suite(), path)
    return path


def _record_hidden(
    lm: Any, features_path: Path, prompts: dict[str, list[int]], source: HiddenSource, batch_size: int
) -> bool:
    """Add (or replace) the ``lm_hidden`` column of ``features.parquet``: a prefill pass over the queries.

    Queries skipped for not fitting the context get NaN (they have no outcome rows).

    Returns:
        Whether the column was written (False: it was already there, from the same source).
    """
    table = pq.read_table(features_path)
    metadata = dict(table.schema.metadata or {})
    recorded = metadata.get(HIDDEN_METADATA.encode())
    if HIDDEN_COLUMN in table.column_names and recorded is not None and json.loads(recorded) == source.to_dict():
        return False
    started = time.perf_counter()
    ids = table.column("id").to_pylist()
    present = [query_id for query_id in ids if query_id in prompts]
    vectors = np.full((len(ids), source.size), np.nan, dtype=np.float32)
    computed = lm.prompt_hidden([prompts[query_id] for query_id in present], source.layer, batch_size)
    row_of = {query_id: k for k, query_id in enumerate(ids)}
    vectors[[row_of[query_id] for query_id in present]] = computed
    if HIDDEN_COLUMN in table.column_names:
        table = table.drop_columns([HIDDEN_COLUMN])
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), source.size)
    metadata[HIDDEN_METADATA.encode()] = json.dumps(source.to_dict()).encode()
    table = table.append_column(HIDDEN_COLUMN, column).replace_schema_metadata(metadata)
    write_table_atomic(table, features_path)
    logger.info(
        "recorded the hidden state (layer %d of %s) of %d prompts in %.1f s",
        source.layer, source.model, len(present), time.perf_counter() - started,
    )  # fmt: skip
    return True


def add_features(
    table: str | Path,
    features: str = LM_HIDDEN,
    hidden_layer: int | None = None,
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 32,
) -> HiddenSource | None:
    """Record a feature spec's columns in a finished table without decoding again (``tokenopt add-features``).

    For ``lm-hidden``: loads the table's own model with its prompt format (from the
    manifest), runs a prefill pass over its queries and writes the ``lm_hidden`` column
    of ``features.parquet`` and the manifest's ``lm_hidden`` record. The outcome rows
    are not touched. ``prompt-text`` is always recorded already.

    Args:
        table: the table folder.
        features: the spec whose columns to record.
        hidden_layer: the hidden state's layer; None: the middle block.
        model: where the table's model is now, when it moved; None: where the manifest says.
        device: the LM's device.
        dtype: the LM's dtype.
        batch_size: prompts per prefill pass.

    Returns:
        The hidden state's source, or None when the spec needs no new column.

    Raises:
        ValueError: an unknown spec, a table collected from an upstream server (which
            cannot return hidden states), or a table that is not finished.
    """
    from tokenopt.lm.local import TransformersLM
    from tokenopt.table.reader import load_manifest

    table = Path(table)
    if LM_HIDDEN not in check_feature_spec_name(features):
        return None
    manifest = load_manifest(table)
    backend: dict[str, Any] = dict(manifest["backend"])  # type: ignore[call-overload]
    if backend.get("kind") != "transformers":
        raise ValueError(
            f"{table} was collected from an upstream server ({backend.get('kind')}), which cannot return the LM's "
            "hidden states; lm-hidden needs the model run locally: collect the table with --model"
        )
    if not manifest.get("complete"):
        raise ValueError(
            f"{table} is not finished; complete it with `tokenopt collect` (--features lm-hidden works there too)"
        )
    settings: dict[str, Any] = dict(manifest["settings"])  # type: ignore[call-overload]
    known = {field.name for field in dataclasses.fields(CollectConfig)}
    config = CollectConfig(**{key: value for key, value in settings.items() if key in known})
    lm = TransformersLM(model or config.model, device, dtype, config.prompt_format(), config.temperature)
    queries = pq.read_table(table / QUERIES_FILE, columns=["id", "question"])
    ids = queries.column("id").to_pylist()
    budget = max(int(budget) for budget in config.budgets)
    prompts = {
        query_id: prompt
        for query_id, prompt in zip(ids, lm.encode_prompts(queries.column("question").to_pylist()), strict=True)
        if lm.fits(prompt, budget)
    }
    layer = lm.default_hidden_layer() if hidden_layer is None else hidden_layer
    source = HiddenSource(model=str(settings.get("model_name", lm.name)), layer=layer, size=lm.hidden_size)
    _record_hidden(lm, table / FEATURES_FILE, prompts, source, batch_size)
    manifest["lm_hidden"] = source.to_dict()
    write_json_atomic(manifest, table / MANIFEST_FILE)
    return source


def collect_shard(
    lm: Any,
    queries: list[Query],
    prompts: dict[str, list[int]],
    modes: list[Mode],
    budgets: list[int],
    batch_size: int,
    seed: int,
    advance: Callable[[int], None] | None = None,
) -> pa.Table:
    """Every action's outcome for a list of queries: the rows of one shard.

    ``lm`` is anything with the LM backend's ``run(prompts, mode, budgets, seeds)``
    (the local transformers backend, or one that drives a remote server); a query's
    sampling seed depends only on ``seed`` and its id, so where a shard is collected
    (this process, a Ray actor) does not change its rows.

    Args:
        lm: the backend.
        queries: the shard's queries (all with a prompt in ``prompts``).
        prompts: prompt token ids by query id.
        modes: the decoding modes of the action table.
        budgets: its budgets, increasing.
        batch_size: queries decoded together.
        seed: the collection's seed.
        advance: called with the number of queries each finished batch adds.
    """
    prompt_tokens = {query.id: len(prompts[query.id]) for query in queries}
    records: dict[str, list[object]] = {name: [] for name in OUTCOME_SCHEMA.names}
    for start in range(0, len(queries), batch_size):
        batch = queries[start : start + batch_size]
        batch_prompts = [prompts[q.id] for q in batch]
        seeds = [_query_seed(seed, q.id) for q in batch]
        for mode in modes:
            results = lm.run(batch_prompts, mode, budgets, seeds)
            for query, per_budget in zip(batch, results, strict=True):
                for budget in budgets:
                    outcome = per_budget[budget]
                    records["id"].append(query.id)
                    records["split"].append(query.split)
                    records["action"].append(f"b{budget}/{mode.name}")
                    records["budget"].append(budget)
                    records["mode"].append(mode.name)
                    records["answer"].append(outcome.answer)
                    records["em"].append(exact_match(outcome.answer, query.answers))
                    records["reasoning_tokens"].append(outcome.reasoning_tokens)
                    records["cue_tokens"].append(outcome.cue_tokens)
                    records["answer_tokens"].append(outcome.answer_tokens)
                    records["prompt_tokens"].append(prompt_tokens[query.id])
                    records["billed_tokens"].append(outcome.billed_tokens)
                    records["latency_ms"].append(outcome.latency_ms)
                    records["confidence"].append(outcome.confidence)
                    records["answer_logprob"].append(outcome.answer_logprob)
                    records["natural_stop"].append(outcome.natural_stop)
                    records["n_sequences"].append(outcome.n_sequences)
                    records["sample_answers"].append(outcome.sample_answers)
                    records["sample_em"].append([exact_match(a, query.answers) for a in outcome.sample_answers])
                    records["sample_tokens"].append(outcome.sample_tokens)
                    records["sample_logprobs"].append(outcome.sample_logprobs)
        if advance is not None:
            advance(len(batch))
    return pa.table(records, schema=OUTCOME_SCHEMA)


ShardRunner = Callable[[list[tuple[Path, list[Query]]], dict[str, list[int]], Callable[[int], None]], tuple[int, int]]
"""Collects and writes pending shards elsewhere (see :mod:`tokenopt.collect.ray`): called with
``(shard path, runnable queries)`` pairs, the prompts and ``advance``; returns (rows, forward tokens)."""


def collect(
    config: CollectConfig,
    progress: Callable[[int, int], None] | None = None,
    shard_runner: ShardRunner | None = None,
    runner_info: dict[str, object] | None = None,
) -> CollectSummary:
    """Collect the outcome table.

    Args:
        config: the settings.
        progress: called as ``progress(queries_done, queries_total)``.
        shard_runner: collects the shards not yet written (e.g. on Ray workers)
            instead of this process; the rows do not depend on where a shard runs.
        runner_info: what the manifest records under ``runner`` about the shard runner.

    Returns:
        What was done.

    Raises:
        ValueError: bad settings or data (before any LM work), or an output folder
            that holds a collection made with other settings.
        FileNotFoundError: the question file or the model folder does not exist.
    """
    from tokenopt.lm.local import TransformersLM

    started = time.perf_counter()
    budgets = parse_budgets(config.budgets)
    modes = parse_modes(config.modes)
    actions = build_action_table(budgets, modes)
    prompt_format = config.prompt_format()
    if config.batch_size < 1 or config.shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1; got {config.batch_size} and {config.shard_size}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    data_path = _prepare_data(config, out)
    queries = load_questions(data_path, seed=config.seed)
    if config.splits is not None:
        unknown = sorted(set(config.splits) - {"train", "val", "test"})
        if unknown:
            raise ValueError(f"unknown splits {unknown}: expected train, val or test")
        queries = [q for q in queries if q.split in config.splits]
        if not queries:
            raise ValueError(f"no query of {data_path} is in the splits {config.splits}")

    record_hidden = LM_HIDDEN in check_feature_spec_name(config.features)
    if record_hidden and config.upstream is not None:
        raise ValueError(
            f"--features {config.features} records the LM's hidden state at prefill, which an --upstream server "
            "cannot return (the OpenAI API gives text and log-probabilities only): collect with a local --model, "
            "or use --features prompt-text"
        )
    lm: Any
    if config.upstream is not None:
        from tokenopt.lm.upstream import UpstreamLM

        if config.model is not None:
            raise ValueError("--model and --upstream exclude each other: the upstream server holds the model")
        lm = UpstreamLM(
            config.upstream,
            config.upstream_model,
            prompt_format,
            config.temperature,
            config.upstream_api_key,
            config.concurrency,
            modes=modes,
        )
        backend = lm.describe()
    else:
        lm = TransformersLM(config.model, config.device, config.dtype, prompt_format, config.temperature)
        backend = {"kind": "transformers", "model": lm.name, "dtype": str(lm.dtype).replace("torch.", "")}
    extractor = PromptFeatures()
    # Where and how fast the LM runs does not change the rows (the model name is in model_name).
    # The features recorded do not change the rows either: a finished table may get lm-hidden added later.
    unrecorded = {"out", "device", "batch_size", "strict", "concurrency", "features", "hidden_layer"}
    unrecorded |= {"upstream", "upstream_model", "upstream_api_key"}
    settings = {key: value for key, value in asdict(config).items() if key not in unrecorded}
    settings["data_sha256"] = _sha256(data_path)
    settings["model_name"] = lm.name
    manifest_path = out / MANIFEST_FILE
    manifest: dict[str, object] = {
        "schema_version": SCHEMA_VERSION,
        "backend": backend,
        "settings": settings,
        "actions": [{"name": a.name, "budget": a.budget, "mode": a.mode} for a in actions],
        "feature_spec": extractor.spec.to_dict(),
        "data": str(data_path),
        "complete": False,
    }
    if runner_info is not None:
        manifest["runner"] = runner_info
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text(encoding="utf-8"))
        old_settings = previous.get("settings", {})
        differing = sorted(k for k in set(old_settings) | set(settings) if old_settings.get(k) != settings.get(k))
        if differing or previous.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"{out} holds a collection made with other settings ({', '.join(differing) or 'schema version'} "
                "differ); give a new --out to keep both, or delete the folder to start over"
            )
        if "lm_hidden" in previous:
            manifest["lm_hidden"] = previous["lm_hidden"]
    write_json_atomic(manifest, manifest_path)

    prompts: dict[str, list[int]] = {}
    skipped: list[str] = []
    for query, ids in zip(queries, lm.encode_prompts([q.question for q in queries]), strict=True):
        if not lm.fits(ids, budgets[-1]):
            message = (
                f"query {query.id!r}: prompt of {len(ids)} tokens + budget {budgets[-1]} + cue + "
                f"{config.max_answer_tokens} answer tokens exceeds the model's context of {lm.max_context}"
            )
            if config.strict:
                raise ValueError(message + " (--strict)")
            skipped.append(query.id)
            continue
        prompts[query.id] = ids
    if skipped:
        logger.warning("skipped %d of %d queries whose prompt does not fit the context", len(skipped), len(queries))

    prompt_tokens = {query_id: len(ids) for query_id, ids in prompts.items()}
    queries_path = out / QUERIES_FILE
    if not queries_path.exists():
        write_table_atomic(_queries_table(queries, prompt_tokens), queries_path)
    features_path = out / FEATURES_FILE
    if not features_path.exists():
        vectors = extractor.batch([q.question for q in queries])
        features = pa.table(
            {
                "id": [q.id for q in queries],
                "split": [q.split for q in queries],
                "features": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), extractor.dim),
            }
        ).replace_schema_metadata({"tokenopt.feature_spec": json.dumps(extractor.spec.to_dict())})
        write_table_atomic(features, features_path)

    if record_hidden:
        layer = lm.default_hidden_layer() if config.hidden_layer is None else config.hidden_layer
        source = HiddenSource(model=lm.name, layer=layer, size=lm.hidden_size)
        if _record_hidden(lm, features_path, prompts, source, config.batch_size):
            manifest["lm_hidden"] = source.to_dict()
            write_json_atomic(manifest, manifest_path)

    shard_dir = out / OUTCOMES_DIR
    shard_dir.mkdir(exist_ok=True)
    shards = [queries[i : i + config.shard_size] for i in range(0, len(queries), config.shard_size)]
    written = reused = rows_total = 0
    done = 0
    pending: list[tuple[Path, list[Query]]] = []

    def advance(batch_done: int) -> None:
        nonlocal done
        done += batch_done
        if progress is not None:
            progress(done, len(queries))

    for index, shard in enumerate(shards):
        path = shard_path(out, index)
        if path.exists():
            reused += 1
            rows_total += pq.read_metadata(path).num_rows
            done += len(shard)
            if progress is not None:
                progress(done, len(queries))
            continue
        runnable = [q for q in shard if q.id in prompts]
        if shard_runner is not None:
            pending.append((path, runnable))
            done += len(shard) - len(runnable)
            continue
        table = collect_shard(lm, runnable, prompts, modes, budgets, config.batch_size, config.seed, advance)
        done += len(shard) - len(runnable)
        write_table_atomic(table, path)
        written += 1
        rows_total += table.num_rows
    runner_tokens = 0
    if shard_runner is not None and pending:
        runner_rows, runner_tokens = shard_runner(pending, prompts, advance)
        written += len(pending)
        rows_total += runner_rows

    manifest.update(
        {
            "complete": True,
            "rows": rows_total,
            "queries": len(queries),
            "skipped": skipped,
            "shards": len(shards),
        }
    )
    write_json_atomic(manifest, manifest_path)
    return CollectSummary(
        out=out,
        queries=len(queries),
        skipped=skipped,
        rows=rows_total,
        shards_written=written,
        shards_reused=reused,
        seconds=time.perf_counter() - started,
        forward_tokens=lm.stats.forward_tokens + runner_tokens,
    )
