"""The Triton protocol lmwrap serves and speaks, defined once (no torch, no numpy, no tritonclient).

Two model kinds, on one Triton Inference Server:

* **lmdeploy's TurboMind protocol** (lmdeploy 0.2-0.5.1 ``serve/turbomind/chatbot.py``, which
  lagent 0.2.4's ``TritonClient`` drives): ``preprocessing`` (text -> token ids), ``turbomind``
  (decoupled: streamed, cumulative ``output_ids`` of the whole session) and ``postprocessing``
  (token ids -> text). Sessions: ``CORRID`` is the session id, ``START`` / ``END`` / ``STOP``
  start, end and cancel, ``step`` is how many of the session's tokens the new turn follows.
* **Triton's LLM convention** (the vLLM / TensorRT-LLM backends): one decoupled text model taking
  ``text_input``, ``stream``, ``sampling_parameters`` (JSON) and ``exclude_input_in_output`` and
  answering ``text_output``.

Shapes use -1 for a free dimension. Datatypes are Triton's names (``UINT32``, ``BYTES``, ...).
"""
from dataclasses import dataclass
from typing import Dict, Tuple

PREPROCESSING = 'preprocessing'
TURBOMIND = 'turbomind'
POSTPROCESSING = 'postprocessing'
#: An extra unary model: the engine's counters as JSON (KV blocks free, tokens computed, ...).
STATS = 'lmwrap_stats'
#: The text model's default name (``lmwrap serve triton --text-model-name``).
TEXT_MODEL = 'lmwrap'

#: What ``preprocessing`` answers for these queries: ``[[bos_id]]`` / ``[[eos_id]]``.
BOS_QUERY, EOS_QUERY = '<BOS>', '<EOS>'
#: The ``turbomind`` model config's parameter naming the chat template (``Chatbot(model_name='')`` reads it).
MODEL_NAME_PARAMETER = 'model_name'


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model."""

    name: str
    datatype: str
    shape: Tuple[int, ...]
    optional: bool = False


def _specs(*specs: TensorSpec) -> Dict[str, TensorSpec]:
    return {spec.name: spec for spec in specs}


PREPROCESSING_INPUTS = _specs(TensorSpec('QUERY', 'BYTES', (-1, -1)))
PREPROCESSING_OUTPUTS = _specs(TensorSpec('INPUT_ID', 'UINT32', (-1, -1)),
                               TensorSpec('REQUEST_INPUT_LEN', 'UINT32', (-1, -1)))

_SCALAR = (-1, -1)  # lmdeploy sends [1, 1]
TURBOMIND_INPUTS = _specs(
    TensorSpec('input_ids', 'UINT32', (-1, -1)),
    TensorSpec('input_lengths', 'UINT32', _SCALAR),
    TensorSpec('request_output_len', 'UINT32', _SCALAR),
    TensorSpec('runtime_top_p', 'FP32', _SCALAR, optional=True),
    TensorSpec('runtime_top_k', 'UINT32', _SCALAR, optional=True),
    TensorSpec('temperature', 'FP32', _SCALAR, optional=True),
    TensorSpec('repetition_penalty', 'FP32', _SCALAR, optional=True),
    TensorSpec('step', 'INT32', _SCALAR, optional=True),
    TensorSpec('stop_words_list', 'INT32', (-1, 2, -1), optional=True),
    TensorSpec('bad_words_list', 'INT32', (-1, 2, -1), optional=True),
    TensorSpec('session_len', 'UINT32', _SCALAR, optional=True),
    TensorSpec('START', 'INT32', _SCALAR, optional=True),
    TensorSpec('END', 'INT32', _SCALAR, optional=True),
    TensorSpec('STOP', 'INT32', _SCALAR, optional=True),
    TensorSpec('CORRID', 'UINT64', _SCALAR, optional=True),
    TensorSpec('random_seed', 'UINT64', _SCALAR, optional=True),
)
#: ``output_ids`` is ``[1, 1, sequence_length]``: the whole session (history, this turn's input, the
#: generated ids, a stop id included); ``sequence_length`` ``[1, 1]``.
TURBOMIND_OUTPUTS = _specs(TensorSpec('output_ids', 'UINT32', (-1, -1, -1)),
                           TensorSpec('sequence_length', 'UINT32', _SCALAR))

POSTPROCESSING_INPUTS = _specs(TensorSpec('TOKENS_BATCH', 'UINT32', (-1, -1, -1)),
                               TensorSpec('sequence_length', 'UINT32', _SCALAR),
                               TensorSpec('skip_special_tokens', 'INT32', _SCALAR, optional=True))
POSTPROCESSING_OUTPUTS = _specs(TensorSpec('OUTPUT', 'BYTES', (-1,)))

STATS_INPUTS = _specs(TensorSpec('QUERY', 'BYTES', (-1,), optional=True))
STATS_OUTPUTS = _specs(TensorSpec('STATS_JSON', 'BYTES', (-1,)))

TEXT_INPUTS = _specs(
    TensorSpec('text_input', 'BYTES', (-1,)),
    TensorSpec('stream', 'BOOL', (-1,), optional=True),
    TensorSpec('sampling_parameters', 'BYTES', (-1,), optional=True),
    TensorSpec('exclude_input_in_output', 'BOOL', (-1,), optional=True),
)
TEXT_OUTPUTS = _specs(TensorSpec('text_output', 'BYTES', (-1,)))

#: ``sampling_parameters`` keys the text model takes (vLLM's names) and their defaults (vLLM's).
TEXT_SAMPLING_DEFAULTS = dict(max_tokens=16, temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                              stop=None, seed=None, min_tokens=0, ignore_eos=False, skip_special_tokens=True,
                              include_stop_str_in_output=False)
