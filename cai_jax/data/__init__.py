"""Data on disk and in batches: jsonl I/O, dataset readers, SFT/RM batching.

`jsonl` holds the file guarantees (line-numbered `DataError`s, atomic and
resumable writes, stage manifests), `keys` the prompt keys and derived seeds
that make the generation stages resumable, `sources` the readers for the
datasets the pipeline starts from, `batching` the host-side NumPy batches the
train steps consume.
"""

from cai_jax.data.batching import (BatchIterator, pack_examples, pad_examples, pad_pairs,
                                   read_comparisons, tokenize_conversations, tokenize_pairs)
from cai_jax.data.jsonl import (MANIFEST_NAME, DataError, ResumableWriter, atomic_write_json,
                                atomic_write_jsonl, code_version, config_fingerprint, data_error,
                                file_sha256, is_hub_name, manifest_matches, read_manifest,
                                read_records, require, write_manifest)
from cai_jax.data.sources import (HELPFUL_SUBSETS, HH_SUBSETS, parse_hh_transcript,
                                  read_chat_records, read_hh_pairs, read_red_team_prompts)

__all__ = [
    "BatchIterator", "DataError", "HELPFUL_SUBSETS", "HH_SUBSETS", "MANIFEST_NAME",
    "ResumableWriter", "atomic_write_json", "atomic_write_jsonl", "code_version",
    "config_fingerprint", "data_error", "file_sha256", "is_hub_name", "manifest_matches",
    "pack_examples", "pad_examples", "pad_pairs", "parse_hh_transcript", "read_chat_records",
    "read_comparisons", "read_hh_pairs", "read_manifest", "read_records",
    "read_red_team_prompts", "require", "tokenize_conversations", "tokenize_pairs",
    "write_manifest",
]
