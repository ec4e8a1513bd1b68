from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Editor(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EDITOR_UNSPECIFIED: _ClassVar[Editor]
    EDITOR_MULTEDIT: _ClassVar[Editor]
    EDITOR_VISEDIT: _ClassVar[Editor]
    EDITOR_FT: _ClassVar[Editor]
    EDITOR_KEYGATE: _ClassVar[Editor]
    EDITOR_ALPHAEDIT: _ClassVar[Editor]

class Diagnostic(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIAGNOSTIC_UNSPECIFIED: _ClassVar[Diagnostic]
    DIAGNOSTIC_TRACE: _ClassVar[Diagnostic]
    DIAGNOSTIC_NOISE_TRACE: _ClassVar[Diagnostic]
    DIAGNOSTIC_KNOCKOUT: _ClassVar[Diagnostic]
    DIAGNOSTIC_CONTRIBUTIONS: _ClassVar[Diagnostic]
    DIAGNOSTIC_MODULE_ATTRIBUTION: _ClassVar[Diagnostic]
    DIAGNOSTIC_VISUAL_ATTRIBUTION: _ClassVar[Diagnostic]
    DIAGNOSTIC_RECOMMEND: _ClassVar[Diagnostic]
EDITOR_UNSPECIFIED: Editor
EDITOR_MULTEDIT: Editor
EDITOR_VISEDIT: Editor
EDITOR_FT: Editor
EDITOR_KEYGATE: Editor
EDITOR_ALPHAEDIT: Editor
DIAGNOSTIC_UNSPECIFIED: Diagnostic
DIAGNOSTIC_TRACE: Diagnostic
DIAGNOSTIC_NOISE_TRACE: Diagnostic
DIAGNOSTIC_KNOCKOUT: Diagnostic
DIAGNOSTIC_CONTRIBUTIONS: Diagnostic
DIAGNOSTIC_MODULE_ATTRIBUTION: Diagnostic
DIAGNOSTIC_VISUAL_ATTRIBUTION: Diagnostic
DIAGNOSTIC_RECOMMEND: Diagnostic

class AdapterRef(_message.Message):
    __slots__ = ("adapter", "version", "alias", "base")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    version: int
    alias: str
    base: bool
    def __init__(self, adapter: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ..., base: _Optional[bool] = ...) -> None: ...

class Served(_message.Message):
    __slots__ = ("adapter", "version", "alias")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    version: int
    alias: str
    def __init__(self, adapter: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "step", "steps", "item", "items", "loss", "message", "queue_position", "elapsed_seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    step: int
    steps: int
    item: int
    items: int
    loss: float
    message: str
    queue_position: int
    elapsed_seconds: float
    def __init__(self, stage: _Optional[str] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ..., item: _Optional[int] = ..., items: _Optional[int] = ..., loss: _Optional[float] = ..., message: _Optional[str] = ..., queue_position: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class Matrix(_message.Message):
    __slots__ = ("name", "rows", "cols", "values", "row_labels", "col_labels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ROW_LABELS_FIELD_NUMBER: _ClassVar[int]
    COL_LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    rows: int
    cols: int
    values: _containers.RepeatedScalarFieldContainer[float]
    row_labels: _containers.RepeatedScalarFieldContainer[str]
    col_labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ..., row_labels: _Optional[_Iterable[str]] = ..., col_labels: _Optional[_Iterable[str]] = ...) -> None: ...

class Figure(_message.Message):
    __slots__ = ("name", "png")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    name: str
    png: bytes
    def __init__(self, name: _Optional[str] = ..., png: _Optional[bytes] = ...) -> None: ...

class LayerRecommendation(_message.Message):
    __slots__ = ("editor", "layer", "scores", "candidates", "criterion", "cases", "nothing_localised")
    EDITOR_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    CASES_FIELD_NUMBER: _ClassVar[int]
    NOTHING_LOCALISED_FIELD_NUMBER: _ClassVar[int]
    editor: str
    layer: int
    scores: _containers.RepeatedScalarFieldContainer[float]
    candidates: _containers.RepeatedScalarFieldContainer[int]
    criterion: str
    cases: int
    nothing_localised: bool
    def __init__(self, editor: _Optional[str] = ..., layer: _Optional[int] = ..., scores: _Optional[_Iterable[float]] = ..., candidates: _Optional[_Iterable[int]] = ..., criterion: _Optional[str] = ..., cases: _Optional[int] = ..., nothing_localised: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("image", "prompt", "adapter", "max_new_tokens")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    prompt: str
    adapter: AdapterRef
    max_new_tokens: int
    def __init__(self, image: _Optional[bytes] = ..., prompt: _Optional[str] = ..., adapter: _Optional[_Union[AdapterRef, _Mapping]] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "served", "prompt_tokens", "answer_tokens", "seconds")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    served: Served
    prompt_tokens: int
    answer_tokens: int
    seconds: float
    def __init__(self, text: _Optional[str] = ..., served: _Optional[_Union[Served, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., answer_tokens: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "served", "done", "answer_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    served: Served
    done: bool
    answer_tokens: int
    def __init__(self, text: _Optional[str] = ..., served: _Optional[_Union[Served, _Mapping]] = ..., done: _Optional[bool] = ..., answer_tokens: _Optional[int] = ...) -> None: ...

class KeyGateOptions(_message.Message):
    __slots__ = ("layer", "steps", "lr", "lr_scale", "max_norm", "target_prob", "threshold", "same_subject_cos", "guard", "scope", "variants")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LR_SCALE_FIELD_NUMBER: _ClassVar[int]
    MAX_NORM_FIELD_NUMBER: _ClassVar[int]
    TARGET_PROB_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SAME_SUBJECT_COS_FIELD_NUMBER: _ClassVar[int]
    GUARD_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    steps: int
    lr: float
    lr_scale: str
    max_norm: float
    target_prob: float
    threshold: float
    same_subject_cos: float
    guard: bool
    scope: str
    variants: bool
    def __init__(self, layer: _Optional[int] = ..., steps: _Optional[int] = ..., lr: _Optional[float] = ..., lr_scale: _Optional[str] = ..., max_norm: _Optional[float] = ..., target_prob: _Optional[float] = ..., threshold: _Optional[float] = ..., same_subject_cos: _Optional[float] = ..., guard: _Optional[bool] = ..., scope: _Optional[str] = ..., variants: _Optional[bool] = ...) -> None: ...

class AlphaEditOptions(_message.Message):
    __slots__ = ("layer", "steps", "lr", "lam", "max_norm", "target_prob", "lr_scale", "null_threshold", "keep_earlier")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LAM_FIELD_NUMBER: _ClassVar[int]
    MAX_NORM_FIELD_NUMBER: _ClassVar[int]
    TARGET_PROB_FIELD_NUMBER: _ClassVar[int]
    LR_SCALE_FIELD_NUMBER: _ClassVar[int]
    NULL_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    KEEP_EARLIER_FIELD_NUMBER: _ClassVar[int]
    layer: int
    steps: int
    lr: float
    lam: float
    max_norm: float
    target_prob: float
    lr_scale: str
    null_threshold: float
    keep_earlier: bool
    def __init__(self, layer: _Optional[int] = ..., steps: _Optional[int] = ..., lr: _Optional[float] = ..., lam: _Optional[float] = ..., max_norm: _Optional[float] = ..., target_prob: _Optional[float] = ..., lr_scale: _Optional[str] = ..., null_threshold: _Optional[float] = ..., keep_earlier: _Optional[bool] = ...) -> None: ...

class MultEditOptions(_message.Message):
    __slots__ = ("layer", "steps", "lr", "lam", "max_norm", "target_prob", "lr_scale")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LAM_FIELD_NUMBER: _ClassVar[int]
    MAX_NORM_FIELD_NUMBER: _ClassVar[int]
    TARGET_PROB_FIELD_NUMBER: _ClassVar[int]
    LR_SCALE_FIELD_NUMBER: _ClassVar[int]
    layer: int
    steps: int
    lr: float
    lam: float
    max_norm: float
    target_prob: float
    lr_scale: str
    def __init__(self, layer: _Optional[int] = ..., steps: _Optional[int] = ..., lr: _Optional[float] = ..., lam: _Optional[float] = ..., max_norm: _Optional[float] = ..., target_prob: _Optional[float] = ..., lr_scale: _Optional[str] = ...) -> None: ...

class FineTuneOptions(_message.Message):
    __slots__ = ("layer", "steps", "lr", "max_change", "target_prob")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MAX_CHANGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_PROB_FIELD_NUMBER: _ClassVar[int]
    layer: int
    steps: int
    lr: float
    max_change: float
    target_prob: float
    def __init__(self, layer: _Optional[int] = ..., steps: _Optional[int] = ..., lr: _Optional[float] = ..., max_change: _Optional[float] = ..., target_prob: _Optional[float] = ...) -> None: ...

class VisEditOptions(_message.Message):
    __slots__ = ("editor_adapter", "editor_version")
    EDITOR_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    EDITOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    editor_adapter: str
    editor_version: int
    def __init__(self, editor_adapter: _Optional[str] = ..., editor_version: _Optional[int] = ...) -> None: ...

class EditRequest(_message.Message):
    __slots__ = ("adapter", "editor", "image", "question", "constraint", "answer", "rephrase", "image_rephrase", "multedit", "visedit", "no_promote", "description", "editor_name", "ft", "editor_options", "keygate", "alphaedit", "keep_unreached", "strict")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    EDITOR_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    REPHRASE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_REPHRASE_FIELD_NUMBER: _ClassVar[int]
    MULTEDIT_FIELD_NUMBER: _ClassVar[int]
    VISEDIT_FIELD_NUMBER: _ClassVar[int]
    NO_PROMOTE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    EDITOR_NAME_FIELD_NUMBER: _ClassVar[int]
    FT_FIELD_NUMBER: _ClassVar[int]
    EDITOR_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    KEYGATE_FIELD_NUMBER: _ClassVar[int]
    ALPHAEDIT_FIELD_NUMBER: _ClassVar[int]
    KEEP_UNREACHED_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    editor: Editor
    image: bytes
    question: str
    constraint: str
    answer: str
    rephrase: str
    image_rephrase: bytes
    multedit: MultEditOptions
    visedit: VisEditOptions
    no_promote: bool
    description: str
    editor_name: str
    ft: FineTuneOptions
    editor_options: _struct_pb2.Struct
    keygate: KeyGateOptions
    alphaedit: AlphaEditOptions
    keep_unreached: bool
    strict: bool
    def __init__(self, adapter: _Optional[str] = ..., editor: _Optional[_Union[Editor, str]] = ..., image: _Optional[bytes] = ..., question: _Optional[str] = ..., constraint: _Optional[str] = ..., answer: _Optional[str] = ..., rephrase: _Optional[str] = ..., image_rephrase: _Optional[bytes] = ..., multedit: _Optional[_Union[MultEditOptions, _Mapping]] = ..., visedit: _Optional[_Union[VisEditOptions, _Mapping]] = ..., no_promote: _Optional[bool] = ..., description: _Optional[str] = ..., editor_name: _Optional[str] = ..., ft: _Optional[_Union[FineTuneOptions, _Mapping]] = ..., editor_options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., keygate: _Optional[_Union[KeyGateOptions, _Mapping]] = ..., alphaedit: _Optional[_Union[AlphaEditOptions, _Mapping]] = ..., keep_unreached: _Optional[bool] = ..., strict: _Optional[bool] = ...) -> None: ...

class EditEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: Version
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[Version, _Mapping]] = ...) -> None: ...

class TrainVisEditRequest(_message.Message):
    __slots__ = ("adapter", "cases_path", "layer", "steps", "no_promote", "train")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    CASES_PATH_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    NO_PROMOTE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    cases_path: str
    layer: int
    steps: int
    no_promote: bool
    train: VisEditTrainOptions
    def __init__(self, adapter: _Optional[str] = ..., cases_path: _Optional[str] = ..., layer: _Optional[int] = ..., steps: _Optional[int] = ..., no_promote: _Optional[bool] = ..., train: _Optional[_Union[VisEditTrainOptions, _Mapping]] = ...) -> None: ...

class VisEditTrainOptions(_message.Message):
    __slots__ = ("signal_layer", "lr", "width", "heads", "synthetic", "batch_size", "seed", "mapper_tied", "synthetic_locality", "per_entity", "eval_every", "checkpoint_every", "im_tokens")
    SIGNAL_LAYER_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAPPER_TIED_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_LOCALITY_FIELD_NUMBER: _ClassVar[int]
    PER_ENTITY_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    IM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    signal_layer: int
    lr: float
    width: int
    heads: int
    synthetic: int
    batch_size: int
    seed: int
    mapper_tied: bool
    synthetic_locality: bool
    per_entity: int
    eval_every: int
    checkpoint_every: int
    im_tokens: int
    def __init__(self, signal_layer: _Optional[int] = ..., lr: _Optional[float] = ..., width: _Optional[int] = ..., heads: _Optional[int] = ..., synthetic: _Optional[int] = ..., batch_size: _Optional[int] = ..., seed: _Optional[int] = ..., mapper_tied: _Optional[bool] = ..., synthetic_locality: _Optional[bool] = ..., per_entity: _Optional[int] = ..., eval_every: _Optional[int] = ..., checkpoint_every: _Optional[int] = ..., im_tokens: _Optional[int] = ...) -> None: ...

class TrainEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: Version
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[Version, _Mapping]] = ...) -> None: ...

class EditRecord(_message.Message):
    __slots__ = ("editor", "layer", "question", "constraint", "answer", "metrics", "layer_evidence", "version", "checks")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EDITOR_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LAYER_EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    editor: str
    layer: int
    question: str
    constraint: str
    answer: str
    metrics: _containers.ScalarMap[str, float]
    layer_evidence: LayerRecommendation
    version: int
    checks: _containers.RepeatedCompositeFieldContainer[EditCheck]
    def __init__(self, editor: _Optional[str] = ..., layer: _Optional[int] = ..., question: _Optional[str] = ..., constraint: _Optional[str] = ..., answer: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., layer_evidence: _Optional[_Union[LayerRecommendation, _Mapping]] = ..., version: _Optional[int] = ..., checks: _Optional[_Iterable[_Union[EditCheck, _Mapping]]] = ...) -> None: ...

class EditCheck(_message.Message):
    __slots__ = ("kind", "question", "answered", "p_answer", "got")
    KIND_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_FIELD_NUMBER: _ClassVar[int]
    P_ANSWER_FIELD_NUMBER: _ClassVar[int]
    GOT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    question: str
    answered: bool
    p_answer: float
    got: str
    def __init__(self, kind: _Optional[str] = ..., question: _Optional[str] = ..., answered: _Optional[bool] = ..., p_answer: _Optional[float] = ..., got: _Optional[str] = ...) -> None: ...

class Version(_message.Message):
    __slots__ = ("adapter", "version", "aliases", "live", "parent", "base_fingerprint", "editors", "num_edits", "created_unix_ms", "description", "edits", "files", "manifest_json", "figures")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EDITORS_FIELD_NUMBER: _ClassVar[int]
    NUM_EDITS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    EDITS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    FIGURES_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    version: int
    aliases: _containers.RepeatedScalarFieldContainer[str]
    live: bool
    parent: int
    base_fingerprint: str
    editors: _containers.RepeatedScalarFieldContainer[str]
    num_edits: int
    created_unix_ms: int
    description: str
    edits: _containers.RepeatedCompositeFieldContainer[EditRecord]
    files: _containers.RepeatedScalarFieldContainer[str]
    manifest_json: str
    figures: _containers.RepeatedCompositeFieldContainer[Figure]
    def __init__(self, adapter: _Optional[str] = ..., version: _Optional[int] = ..., aliases: _Optional[_Iterable[str]] = ..., live: _Optional[bool] = ..., parent: _Optional[int] = ..., base_fingerprint: _Optional[str] = ..., editors: _Optional[_Iterable[str]] = ..., num_edits: _Optional[int] = ..., created_unix_ms: _Optional[int] = ..., description: _Optional[str] = ..., edits: _Optional[_Iterable[_Union[EditRecord, _Mapping]]] = ..., files: _Optional[_Iterable[str]] = ..., manifest_json: _Optional[str] = ..., figures: _Optional[_Iterable[_Union[Figure, _Mapping]]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdapterSummary(_message.Message):
    __slots__ = ("name", "live_version", "latest_version", "num_versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    live_version: int
    latest_version: int
    num_versions: int
    def __init__(self, name: _Optional[str] = ..., live_version: _Optional[int] = ..., latest_version: _Optional[int] = ..., num_versions: _Optional[int] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "default_adapter")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterSummary]
    default_adapter: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterSummary, _Mapping]]] = ..., default_adapter: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("adapter", "page_size", "page_token")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    page_size: int
    page_token: str
    def __init__(self, adapter: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("adapter", "versions", "aliases", "live_version", "next_page_token")
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    LIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    versions: _containers.RepeatedCompositeFieldContainer[Version]
    aliases: _containers.ScalarMap[str, int]
    live_version: int
    next_page_token: str
    def __init__(self, adapter: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[Version, _Mapping]]] = ..., aliases: _Optional[_Mapping[str, int]] = ..., live_version: _Optional[int] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetVersionRequest(_message.Message):
    __slots__ = ("adapter", "version", "alias", "include_figures")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FIGURES_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    version: int
    alias: str
    include_figures: bool
    def __init__(self, adapter: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ..., include_figures: _Optional[bool] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("adapter", "version", "alias")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    version: int
    alias: str
    def __init__(self, adapter: _Optional[str] = ..., version: _Optional[int] = ..., alias: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("adapter", "to_version")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    to_version: int
    def __init__(self, adapter: _Optional[str] = ..., to_version: _Optional[int] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("live", "previous_version")
    LIVE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    live: Version
    previous_version: int
    def __init__(self, live: _Optional[_Union[Version, _Mapping]] = ..., previous_version: _Optional[int] = ...) -> None: ...

class DeleteVersionRequest(_message.Message):
    __slots__ = ("adapter", "version")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    version: int
    def __init__(self, adapter: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteVersionResponse(_message.Message):
    __slots__ = ("adapter", "version")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    version: int
    def __init__(self, adapter: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DiagnoseOptions(_message.Message):
    __slots__ = ("kinds", "window", "isolate", "replacement", "relations", "layers", "samples", "noise_scale", "seed", "editor", "image_block")
    KINDS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    ISOLATE_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENT_FIELD_NUMBER: _ClassVar[int]
    RELATIONS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NOISE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EDITOR_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BLOCK_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    window: int
    isolate: bool
    replacement: str
    relations: _containers.RepeatedScalarFieldContainer[str]
    layers: _containers.RepeatedScalarFieldContainer[int]
    samples: int
    noise_scale: float
    seed: int
    editor: str
    image_block: int
    def __init__(self, kinds: _Optional[_Iterable[str]] = ..., window: _Optional[int] = ..., isolate: _Optional[bool] = ..., replacement: _Optional[str] = ..., relations: _Optional[_Iterable[str]] = ..., layers: _Optional[_Iterable[int]] = ..., samples: _Optional[int] = ..., noise_scale: _Optional[float] = ..., seed: _Optional[int] = ..., editor: _Optional[str] = ..., image_block: _Optional[int] = ...) -> None: ...

class DiagnoseRequest(_message.Message):
    __slots__ = ("diagnostic", "image", "question", "constraint", "answer", "rephrase", "image_rephrase", "adapter", "options", "png")
    DIAGNOSTIC_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    REPHRASE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_REPHRASE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    diagnostic: Diagnostic
    image: bytes
    question: str
    constraint: str
    answer: str
    rephrase: str
    image_rephrase: bytes
    adapter: AdapterRef
    options: DiagnoseOptions
    png: bool
    def __init__(self, diagnostic: _Optional[_Union[Diagnostic, str]] = ..., image: _Optional[bytes] = ..., question: _Optional[str] = ..., constraint: _Optional[str] = ..., answer: _Optional[str] = ..., rephrase: _Optional[str] = ..., image_rephrase: _Optional[bytes] = ..., adapter: _Optional[_Union[AdapterRef, _Mapping]] = ..., options: _Optional[_Union[DiagnoseOptions, _Mapping]] = ..., png: _Optional[bool] = ...) -> None: ...

class DiagnoseResult(_message.Message):
    __slots__ = ("diagnostic", "served", "values", "scalars", "recommended_layer", "recommendations", "lines", "data_json", "figures", "seconds")
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DIAGNOSTIC_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SCALARS_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDED_LAYER_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATIONS_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    FIGURES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    diagnostic: Diagnostic
    served: Served
    values: _containers.RepeatedCompositeFieldContainer[Matrix]
    scalars: _containers.ScalarMap[str, float]
    recommended_layer: int
    recommendations: _containers.RepeatedCompositeFieldContainer[LayerRecommendation]
    lines: _containers.RepeatedScalarFieldContainer[str]
    data_json: str
    figures: _containers.RepeatedCompositeFieldContainer[Figure]
    seconds: float
    def __init__(self, diagnostic: _Optional[_Union[Diagnostic, str]] = ..., served: _Optional[_Union[Served, _Mapping]] = ..., values: _Optional[_Iterable[_Union[Matrix, _Mapping]]] = ..., scalars: _Optional[_Mapping[str, float]] = ..., recommended_layer: _Optional[int] = ..., recommendations: _Optional[_Iterable[_Union[LayerRecommendation, _Mapping]]] = ..., lines: _Optional[_Iterable[str]] = ..., data_json: _Optional[str] = ..., figures: _Optional[_Iterable[_Union[Figure, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class DiagnoseEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: DiagnoseResult
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[DiagnoseResult, _Mapping]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_image_bytes", "max_image_pixels", "max_prompt_tokens", "max_new_tokens", "max_queued_jobs", "max_message_bytes", "max_job_steps", "max_job_seconds", "max_text_chars", "mutation_wait_s")
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_JOBS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_JOB_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_JOB_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MUTATION_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    max_image_bytes: int
    max_image_pixels: int
    max_prompt_tokens: int
    max_new_tokens: int
    max_queued_jobs: int
    max_message_bytes: int
    max_job_steps: int
    max_job_seconds: float
    max_text_chars: int
    mutation_wait_s: float
    def __init__(self, max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_queued_jobs: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_job_steps: _Optional[int] = ..., max_job_seconds: _Optional[float] = ..., max_text_chars: _Optional[int] = ..., mutation_wait_s: _Optional[float] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "ready", "model_path", "base_fingerprint", "num_layers", "device", "dtype", "default_adapter", "auth_required", "limits", "registry_uri", "editors", "jobs_running", "jobs_queued")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    AUTH_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_URI_FIELD_NUMBER: _ClassVar[int]
    EDITORS_FIELD_NUMBER: _ClassVar[int]
    JOBS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    JOBS_QUEUED_FIELD_NUMBER: _ClassVar[int]
    version: str
    ready: bool
    model_path: str
    base_fingerprint: str
    num_layers: int
    device: str
    dtype: str
    default_adapter: str
    auth_required: bool
    limits: Limits
    registry_uri: str
    editors: _containers.RepeatedScalarFieldContainer[str]
    jobs_running: int
    jobs_queued: int
    def __init__(self, version: _Optional[str] = ..., ready: _Optional[bool] = ..., model_path: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., num_layers: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., default_adapter: _Optional[str] = ..., auth_required: _Optional[bool] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., registry_uri: _Optional[str] = ..., editors: _Optional[_Iterable[str]] = ..., jobs_running: _Optional[int] = ..., jobs_queued: _Optional[int] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("id", "kind", "adapter", "state", "cancelling", "stage", "step", "steps", "seconds", "peer")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CANCELLING_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    id: int
    kind: str
    adapter: str
    state: str
    cancelling: bool
    stage: str
    step: int
    steps: int
    seconds: float
    peer: str
    def __init__(self, id: _Optional[int] = ..., kind: _Optional[str] = ..., adapter: _Optional[str] = ..., state: _Optional[str] = ..., cancelling: _Optional[bool] = ..., stage: _Optional[str] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ..., seconds: _Optional[float] = ..., peer: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...
