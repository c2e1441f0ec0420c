from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATUS_UNSPECIFIED: _ClassVar[RunStatus]
    RUN_STATUS_QUEUED: _ClassVar[RunStatus]
    RUN_STATUS_RUNNING: _ClassVar[RunStatus]
    RUN_STATUS_SUCCEEDED: _ClassVar[RunStatus]
    RUN_STATUS_FAILED: _ClassVar[RunStatus]
    RUN_STATUS_CANCELLED: _ClassVar[RunStatus]

class StageStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_STATUS_UNSPECIFIED: _ClassVar[StageStatus]
    STAGE_STATUS_PENDING: _ClassVar[StageStatus]
    STAGE_STATUS_DISPATCHED: _ClassVar[StageStatus]
    STAGE_STATUS_SUCCEEDED: _ClassVar[StageStatus]
    STAGE_STATUS_FAILED: _ClassVar[StageStatus]
    STAGE_STATUS_RETRYING: _ClassVar[StageStatus]
    STAGE_STATUS_SKIPPED: _ClassVar[StageStatus]
RUN_STATUS_UNSPECIFIED: RunStatus
RUN_STATUS_QUEUED: RunStatus
RUN_STATUS_RUNNING: RunStatus
RUN_STATUS_SUCCEEDED: RunStatus
RUN_STATUS_FAILED: RunStatus
RUN_STATUS_CANCELLED: RunStatus
STAGE_STATUS_UNSPECIFIED: StageStatus
STAGE_STATUS_PENDING: StageStatus
STAGE_STATUS_DISPATCHED: StageStatus
STAGE_STATUS_SUCCEEDED: StageStatus
STAGE_STATUS_FAILED: StageStatus
STAGE_STATUS_RETRYING: StageStatus
STAGE_STATUS_SKIPPED: StageStatus

class SubmitRunRequest(_message.Message):
    __slots__ = ("input_key", "recipe", "parameters", "flag_template", "cont_dat", "label", "input_keys", "mous_id")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INPUT_KEY_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FLAG_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    CONT_DAT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_KEYS_FIELD_NUMBER: _ClassVar[int]
    MOUS_ID_FIELD_NUMBER: _ClassVar[int]
    input_key: str
    recipe: str
    parameters: _containers.ScalarMap[str, str]
    flag_template: str
    cont_dat: str
    label: str
    input_keys: _containers.RepeatedScalarFieldContainer[str]
    mous_id: str
    def __init__(self, input_key: _Optional[str] = ..., recipe: _Optional[str] = ..., parameters: _Optional[_Mapping[str, str]] = ..., flag_template: _Optional[str] = ..., cont_dat: _Optional[str] = ..., label: _Optional[str] = ..., input_keys: _Optional[_Iterable[str]] = ..., mous_id: _Optional[str] = ...) -> None: ...

class StageState(_message.Message):
    __slots__ = ("index", "name", "service", "status", "qa_score", "qa_reasons", "duration_s", "attempts", "error", "params_json")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    QA_SCORE_FIELD_NUMBER: _ClassVar[int]
    QA_REASONS_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    service: str
    status: StageStatus
    qa_score: float
    qa_reasons: _containers.RepeatedScalarFieldContainer[str]
    duration_s: float
    attempts: int
    error: str
    params_json: str
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., service: _Optional[str] = ..., status: _Optional[_Union[StageStatus, str]] = ..., qa_score: _Optional[float] = ..., qa_reasons: _Optional[_Iterable[str]] = ..., duration_s: _Optional[float] = ..., attempts: _Optional[int] = ..., error: _Optional[str] = ..., params_json: _Optional[str] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "status", "recipe", "input_key", "stages", "current_stage", "error", "context_key", "created_unix", "updated_unix", "label", "owner", "mous_id", "eb_run_ids", "parent_run_id", "qa2_verdict", "qa2_comment", "qa2_reviewer", "qa2_time_unix", "trigger_decision_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_KEY_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_STAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    MOUS_ID_FIELD_NUMBER: _ClassVar[int]
    EB_RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARENT_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    QA2_VERDICT_FIELD_NUMBER: _ClassVar[int]
    QA2_COMMENT_FIELD_NUMBER: _ClassVar[int]
    QA2_REVIEWER_FIELD_NUMBER: _ClassVar[int]
    QA2_TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    status: RunStatus
    recipe: str
    input_key: str
    stages: _containers.RepeatedCompositeFieldContainer[StageState]
    current_stage: int
    error: str
    context_key: str
    created_unix: float
    updated_unix: float
    label: str
    owner: str
    mous_id: str
    eb_run_ids: _containers.RepeatedScalarFieldContainer[str]
    parent_run_id: str
    qa2_verdict: str
    qa2_comment: str
    qa2_reviewer: str
    qa2_time_unix: float
    trigger_decision_id: str
    def __init__(self, run_id: _Optional[str] = ..., status: _Optional[_Union[RunStatus, str]] = ..., recipe: _Optional[str] = ..., input_key: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageState, _Mapping]]] = ..., current_stage: _Optional[int] = ..., error: _Optional[str] = ..., context_key: _Optional[str] = ..., created_unix: _Optional[float] = ..., updated_unix: _Optional[float] = ..., label: _Optional[str] = ..., owner: _Optional[str] = ..., mous_id: _Optional[str] = ..., eb_run_ids: _Optional[_Iterable[str]] = ..., parent_run_id: _Optional[str] = ..., qa2_verdict: _Optional[str] = ..., qa2_comment: _Optional[str] = ..., qa2_reviewer: _Optional[str] = ..., qa2_time_unix: _Optional[float] = ..., trigger_decision_id: _Optional[str] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("limit", "page_token")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    limit: int
    page_token: str
    def __init__(self, limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class CancelRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ListProductsRequest(_message.Message):
    __slots__ = ("run_id", "url_expiry_s")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    URL_EXPIRY_S_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    url_expiry_s: int
    def __init__(self, run_id: _Optional[str] = ..., url_expiry_s: _Optional[int] = ...) -> None: ...

class Product(_message.Message):
    __slots__ = ("path", "key", "size", "sha256", "url")
    PATH_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    path: str
    key: str
    size: int
    sha256: str
    url: str
    def __init__(self, path: _Optional[str] = ..., key: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class ListProductsResponse(_message.Message):
    __slots__ = ("products", "bucket")
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    products: _containers.RepeatedCompositeFieldContainer[Product]
    bucket: str
    def __init__(self, products: _Optional[_Iterable[_Union[Product, _Mapping]]] = ..., bucket: _Optional[str] = ...) -> None: ...

class FetchProductRequest(_message.Message):
    __slots__ = ("run_id", "path")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    path: str
    def __init__(self, run_id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class ProductChunk(_message.Message):
    __slots__ = ("data", "offset")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("name", "size", "sha256", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    data: bytes
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadResponse(_message.Message):
    __slots__ = ("key", "size", "sha256")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    key: str
    size: int
    sha256: str
    def __init__(self, key: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class StageRequest(_message.Message):
    __slots__ = ("run_id", "stage_index", "stage", "service", "params_json", "context_key", "input_key", "attempt", "shard", "part_of")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_KEY_FIELD_NUMBER: _ClassVar[int]
    INPUT_KEY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    PART_OF_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    stage_index: int
    stage: str
    service: str
    params_json: str
    context_key: str
    input_key: str
    attempt: int
    shard: int
    part_of: str
    def __init__(self, run_id: _Optional[str] = ..., stage_index: _Optional[int] = ..., stage: _Optional[str] = ..., service: _Optional[str] = ..., params_json: _Optional[str] = ..., context_key: _Optional[str] = ..., input_key: _Optional[str] = ..., attempt: _Optional[int] = ..., shard: _Optional[int] = ..., part_of: _Optional[str] = ...) -> None: ...

class Output(_message.Message):
    __slots__ = ("name", "key", "sha256", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    key: str
    sha256: str
    size: int
    def __init__(self, name: _Optional[str] = ..., key: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class StageEvent(_message.Message):
    __slots__ = ("run_id", "stage_index", "stage", "status", "message", "qa_score", "qa_reasons", "context_key", "outputs", "duration_s", "attempt", "time_unix", "worker", "run_status", "shard", "fanout_json")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    QA_SCORE_FIELD_NUMBER: _ClassVar[int]
    QA_REASONS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_KEY_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    RUN_STATUS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    FANOUT_JSON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    stage_index: int
    stage: str
    status: StageStatus
    message: str
    qa_score: float
    qa_reasons: _containers.RepeatedScalarFieldContainer[str]
    context_key: str
    outputs: _containers.RepeatedCompositeFieldContainer[Output]
    duration_s: float
    attempt: int
    time_unix: float
    worker: str
    run_status: RunStatus
    shard: int
    fanout_json: str
    def __init__(self, run_id: _Optional[str] = ..., stage_index: _Optional[int] = ..., stage: _Optional[str] = ..., status: _Optional[_Union[StageStatus, str]] = ..., message: _Optional[str] = ..., qa_score: _Optional[float] = ..., qa_reasons: _Optional[_Iterable[str]] = ..., context_key: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[Output, _Mapping]]] = ..., duration_s: _Optional[float] = ..., attempt: _Optional[int] = ..., time_unix: _Optional[float] = ..., worker: _Optional[str] = ..., run_status: _Optional[_Union[RunStatus, str]] = ..., shard: _Optional[int] = ..., fanout_json: _Optional[str] = ...) -> None: ...

class StateChange(_message.Message):
    __slots__ = ("event_id", "project_code", "mous_id", "eb_uids", "state", "data_location", "telescope", "array", "time_unix", "source", "run_id", "recipe", "reason", "qa_summary_json", "verdict", "comment", "actor")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_CODE_FIELD_NUMBER: _ClassVar[int]
    MOUS_ID_FIELD_NUMBER: _ClassVar[int]
    EB_UIDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DATA_LOCATION_FIELD_NUMBER: _ClassVar[int]
    TELESCOPE_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    QA_SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    project_code: str
    mous_id: str
    eb_uids: _containers.RepeatedScalarFieldContainer[str]
    state: str
    data_location: str
    telescope: str
    array: str
    time_unix: float
    source: str
    run_id: str
    recipe: str
    reason: str
    qa_summary_json: str
    verdict: str
    comment: str
    actor: str
    def __init__(self, event_id: _Optional[str] = ..., project_code: _Optional[str] = ..., mous_id: _Optional[str] = ..., eb_uids: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ..., data_location: _Optional[str] = ..., telescope: _Optional[str] = ..., array: _Optional[str] = ..., time_unix: _Optional[float] = ..., source: _Optional[str] = ..., run_id: _Optional[str] = ..., recipe: _Optional[str] = ..., reason: _Optional[str] = ..., qa_summary_json: _Optional[str] = ..., verdict: _Optional[str] = ..., comment: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class TriggerDecision(_message.Message):
    __slots__ = ("decision_id", "time_unix", "event", "rule", "action", "run_id", "reason", "recipe", "recipe_version", "replay_of", "forced", "by")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    RECIPE_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLAY_OF_FIELD_NUMBER: _ClassVar[int]
    FORCED_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    time_unix: float
    event: StateChange
    rule: str
    action: str
    run_id: str
    reason: str
    recipe: str
    recipe_version: int
    replay_of: str
    forced: bool
    by: str
    def __init__(self, decision_id: _Optional[str] = ..., time_unix: _Optional[float] = ..., event: _Optional[_Union[StateChange, _Mapping]] = ..., rule: _Optional[str] = ..., action: _Optional[str] = ..., run_id: _Optional[str] = ..., reason: _Optional[str] = ..., recipe: _Optional[str] = ..., recipe_version: _Optional[int] = ..., replay_of: _Optional[str] = ..., forced: _Optional[bool] = ..., by: _Optional[str] = ...) -> None: ...

class RecordQA2VerdictRequest(_message.Message):
    __slots__ = ("run_id", "verdict", "comment")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    verdict: str
    comment: str
    def __init__(self, run_id: _Optional[str] = ..., verdict: _Optional[str] = ..., comment: _Optional[str] = ...) -> None: ...

class ListTriggerDecisionsRequest(_message.Message):
    __slots__ = ("limit", "page_token", "mous_id")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MOUS_ID_FIELD_NUMBER: _ClassVar[int]
    limit: int
    page_token: str
    mous_id: str
    def __init__(self, limit: _Optional[int] = ..., page_token: _Optional[str] = ..., mous_id: _Optional[str] = ...) -> None: ...

class ListTriggerDecisionsResponse(_message.Message):
    __slots__ = ("decisions", "next_page_token")
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[TriggerDecision]
    next_page_token: str
    def __init__(self, decisions: _Optional[_Iterable[_Union[TriggerDecision, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ReplayTriggerRequest(_message.Message):
    __slots__ = ("decision_id", "force")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    force: bool
    def __init__(self, decision_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...
