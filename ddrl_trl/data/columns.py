"""The columns of reference data: which hold the prompts and the paired reference samples, and checks of both
(missing columns, prompts that are not text, negative prompts, held-out data), before any encoding."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

logger = logging.getLogger(__name__)


REF_LATENTS_COLUMN = "ddrl_ref_latents"


#: Prompt columns of diffusers' text-to-image training data (its scripts' `--caption_column` defaults to "text"), read
#: as the prompts when `prompt_column` is left at its default and the dataset has no "prompt" column.
DIFFUSERS_PROMPT_COLUMNS = ("text", "caption")
DEFAULT_PROMPT_COLUMN = "prompt"


def reference_column_of(dataset: Dataset, configured: str | None, fallback: Dataset | None = None) -> str:
    """The column holding the paired reference samples: `configured`, else `"image"`, else `"video"` if present in
    `dataset`, else in `fallback` (the eval dataset, when the training data hold prompts only)."""
    if configured is not None:
        return configured
    for data in (dataset, fallback):
        found = next((name for name in ("image", "video") if data is not None and name in data.column_names), None)
        if found is not None:
            return found
    return "image"


def prompt_column_of(dataset: Dataset, configured: str) -> str:
    """The column holding the prompts: `configured`; or, when that is the default "prompt" and the dataset has none,
    diffusers' "text" or "caption" column (the first present). A `configured` name other than the default is kept,
    present or not (`check_columns` then names the fix)."""
    if configured != DEFAULT_PROMPT_COLUMN or configured in dataset.column_names:
        return configured
    return next((name for name in DIFFUSERS_PROMPT_COLUMNS if name in dataset.column_names), configured)


def with_prompt_column(dataset: Dataset, prompt_column: str, split: str) -> Dataset:
    """`dataset` with its prompts in `prompt_column`: diffusers' "text" / "caption" column renamed to it when the
    default "prompt" is missing (`prompt_column_of`), with an info log naming the column used."""
    found = prompt_column_of(dataset, prompt_column)
    if found == prompt_column:
        return dataset
    logger.info(
        "The %s dataset has no %r column: using its %r column as the prompts (as diffusers' training scripts do). "
        "Set prompt_column (--prompt_column) to use another column.",
        split,
        prompt_column,
        found,
    )
    return dataset.rename_column(found, prompt_column)


def check_columns(
    dataset: Dataset, prompt_column: str, reference_column: str, split: str, needs_references: bool = True
) -> None:
    """Fail early, naming the fix, when a dataset lacks the prompt column or, if `needs_references`, the paired
    reference column (the training data need it for the data term only, i.e. with data_beta > 0; held-out data always,
    for the held-out diffusion loss)."""
    columns = dataset.column_names
    if prompt_column_of(dataset, prompt_column) not in columns:
        found_too = (
            f" (diffusers' {' and '.join(repr(c) for c in DIFFUSERS_PROMPT_COLUMNS)} columns are read without it)"
            if prompt_column == DEFAULT_PROMPT_COLUMN
            else ""
        )
        raise ValueError(
            f"The {split} dataset has no column {prompt_column!r} with the prompts (its columns: {columns}). Name "
            f"the column holding them with prompt_column= in DDRLConfig (--prompt_column on the command line)"
            f"{found_too}, or rename it (dataset.rename_column)."
        )
    if needs_references and reference_column not in columns:
        if split == "training":
            why = "the data term (data_beta > 0) trains on them"
            off = "; or set data_beta=0 for plain GRPO, which needs prompts only"
        else:
            why = "the held-out diffusion loss (eval_diffusion_loss) is measured on them"
            off = "; or pass no eval_dataset (validation_prompts sample and score the model without references)"
        raise ValueError(
            f"The {split} dataset has no column {reference_column!r} (its columns: {columns}) with a paired reference "
            f"sample per prompt: {why}. Add them (images, or videos for video pipelines; if they are in another "
            f"column, set prompt_column / reference_column in DDRLConfig, --reference_column on the command line), or "
            f"build synthetic ones from the base model with ddrl_trl.build_synthetic_reference_dataset(pipeline, "
            f"prompts) (--synthetic_references_per_prompt K on the command line){off}."
        )
    if len(dataset) == 0:
        raise ValueError(f"The {split} dataset is empty.")


def arrow_column(dataset: Dataset, name: str) -> pa.ChunkedArray:
    """Column `name` of `dataset` (its selected rows, in order) as Arrow, without building Python objects."""
    column = dataset.with_format("arrow")[name]
    return column.column(0) if isinstance(column, pa.Table) else column


def check_prompts(
    dataset: Dataset, prompt_column: str, split: str, allow_empty: bool = False, setting: str = "prompt_column"
) -> None:
    """Fail early, naming the first bad row, when a prompt is not a non-empty string (None, a number, blank).

    `allow_empty`: an empty string is valid (a negative prompt); `setting`: the `DDRLConfig` field naming the column.
    """
    column = arrow_column(dataset, prompt_column)
    kind = "string" if allow_empty else "non-empty string"
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ValueError(
            f"The {split} dataset's column {prompt_column!r} holds {column.type} values (row 0: "
            f"{dataset[0][prompt_column]!r}), "
            f"not text: every value must be a {kind}. Convert the column (e.g. dataset.map) or set "
            f"{setting} to the column holding the prompts."
        )
    invalid = pc.is_null(column)
    if not allow_empty:
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
        invalid = pc.or_kleene(invalid, blank)
    invalid = pc.fill_null(invalid, True)
    count = pc.sum(invalid).as_py() or 0
    if count:
        rows = np.flatnonzero(invalid.to_numpy(zero_copy_only=False))
        fix = f"bool(row[{prompt_column!r}] and row[{prompt_column!r}].strip())"
        raise ValueError(
            f"Row {rows[0]} of the {split} dataset: column {prompt_column!r} holds "
            f"{dataset[int(rows[0])][prompt_column]!r}, "
            f"not a {'string' if allow_empty else 'non-empty prompt'} "
            f"({count} such row(s) in all, e.g. {rows[:5].tolist()}). Fix or drop those rows, "
            f"e.g. dataset.filter(lambda row: {f'row[{prompt_column!r}] is not None' if allow_empty else fix})."
        )


def check_negative_prompts(
    dataset: Dataset, column: str, prompt_column: str, reference_column: str, split: str = "training"
) -> None:
    """Fail early when `negative_prompt_column` is missing from the `split` dataset, is the prompt or reference column,
    or holds anything but strings (empty ones are valid)."""
    if column in (prompt_column, reference_column):
        raise ValueError(
            f"negative_prompt_column={column!r} is the {'prompt' if column == prompt_column else 'reference'} column; "
            f"name the column holding the negative prompts."
        )
    if column not in dataset.column_names:
        raise ValueError(
            f"negative_prompt_column={column!r} is not a column of the {split} dataset (its columns: "
            f"{dataset.column_names})."
            + (
                " The guided held-out loss uses each row's negative prompt, as rollouts do: add the column to it."
                if split == "evaluation"
                else ""
            )
        )
    check_prompts(dataset, column, split, allow_empty=True, setting="negative_prompt_column")


def check_evaluation_dataset(dataset: Dataset, args, reference_column: str) -> None:
    """Fail early, naming the fix, when held-out data lack the prompt or reference column (unless already encoded),
    hold a non-prompt, or lack `negative_prompt_column`, whose rows the guided held-out loss uses as rollouts do."""
    if REF_LATENTS_COLUMN not in dataset.column_names:
        check_columns(dataset, args.prompt_column, reference_column, "evaluation")
    prompt_column = prompt_column_of(dataset, args.prompt_column)  # diffusers' "text" / "caption" too
    check_prompts(dataset, prompt_column, "evaluation")
    if args.negative_prompt_column is not None:
        column = args.negative_prompt_column
        check_negative_prompts(dataset, column, prompt_column, reference_column, "evaluation")
