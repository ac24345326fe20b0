import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ItemSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ITEM_SOURCE_UNSPECIFIED: _ClassVar[ItemSource]
    ITEM_SOURCE_CATALOGUE: _ClassVar[ItemSource]
    ITEM_SOURCE_ENCODED: _ClassVar[ItemSource]
    ITEM_SOURCE_NO_TEXT: _ClassVar[ItemSource]
ITEM_SOURCE_UNSPECIFIED: ItemSource
ITEM_SOURCE_CATALOGUE: ItemSource
ITEM_SOURCE_ENCODED: ItemSource
ITEM_SOURCE_NO_TEXT: ItemSource

class ContextValue(_message.Message):
    __slots__ = ("text", "number")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    text: str
    number: float
    def __init__(self, text: _Optional[str] = ..., number: _Optional[float] = ...) -> None: ...

class HistoryEvent(_message.Message):
    __slots__ = ("item_id", "event_type", "timestamp")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    event_type: str
    timestamp: _timestamp_pb2.Timestamp
    def __init__(self, item_id: _Optional[str] = ..., event_type: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class History(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[HistoryEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[HistoryEvent, _Mapping]]] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("item_id", "text", "features")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    text: str
    features: _containers.ScalarMap[str, float]
    def __init__(self, item_id: _Optional[str] = ..., text: _Optional[str] = ..., features: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("request_id", "user_id", "history", "candidates", "context", "top_k", "explain", "request_time", "candidate_ids", "consistency_token")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ContextValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ContextValue, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIME_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: str
    history: History
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    context: _containers.MessageMap[str, ContextValue]
    top_k: int
    explain: bool
    request_time: _timestamp_pb2.Timestamp
    candidate_ids: _containers.RepeatedScalarFieldContainer[str]
    consistency_token: str
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., history: _Optional[_Union[History, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., context: _Optional[_Mapping[str, ContextValue]] = ..., top_k: _Optional[int] = ..., explain: _Optional[bool] = ..., request_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., candidate_ids: _Optional[_Iterable[str]] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class FeatureContribution(_message.Message):
    __slots__ = ("name", "value", "contribution")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    contribution: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ..., contribution: _Optional[float] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "match_score", "position", "source", "contributions", "bias")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MATCH_SCORE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    match_score: float
    position: int
    source: ItemSource
    contributions: _containers.RepeatedCompositeFieldContainer[FeatureContribution]
    bias: float
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., match_score: _Optional[float] = ..., position: _Optional[int] = ..., source: _Optional[_Union[ItemSource, str]] = ..., contributions: _Optional[_Iterable[_Union[FeatureContribution, _Mapping]]] = ..., bias: _Optional[float] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("request_id", "items", "model_version", "variant")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: str
    variant: str
    def __init__(self, request_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("request_id", "user_id", "history", "top_k", "exclude_item_ids", "include_seen", "context", "explain", "retrieve_k", "request_time", "consistency_token")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ContextValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ContextValue, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    RETRIEVE_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIME_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: str
    history: History
    top_k: int
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    include_seen: bool
    context: _containers.MessageMap[str, ContextValue]
    explain: bool
    retrieve_k: int
    request_time: _timestamp_pb2.Timestamp
    consistency_token: str
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., history: _Optional[_Union[History, _Mapping]] = ..., top_k: _Optional[int] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., include_seen: _Optional[bool] = ..., context: _Optional[_Mapping[str, ContextValue]] = ..., explain: _Optional[bool] = ..., retrieve_k: _Optional[int] = ..., request_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("request_id", "items", "model_version", "variant")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: str
    variant: str
    def __init__(self, request_id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("user_id", "item_id", "event_type", "timestamp", "request_id", "value")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: str
    event_type: str
    timestamp: _timestamp_pb2.Timestamp
    request_id: str
    value: float
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., event_type: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class LogEventsRequest(_message.Message):
    __slots__ = ("events", "idempotency_key")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    idempotency_key: str
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class LogEventsResponse(_message.Message):
    __slots__ = ("accepted", "unknown_items", "new_users", "consistency_token")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEW_USERS_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    unknown_items: int
    new_users: int
    consistency_token: str
    def __init__(self, accepted: _Optional[int] = ..., unknown_items: _Optional[int] = ..., new_users: _Optional[int] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VariantInfo(_message.Message):
    __slots__ = ("variant", "model_version", "ranker", "feature_names", "catalogue_items", "loaded_at", "providers", "baseline", "pinned")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RANKER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    CATALOGUE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    variant: str
    model_version: str
    ranker: str
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    catalogue_items: int
    loaded_at: _timestamp_pb2.Timestamp
    providers: _containers.RepeatedScalarFieldContainer[str]
    baseline: str
    pinned: bool
    def __init__(self, variant: _Optional[str] = ..., model_version: _Optional[str] = ..., ranker: _Optional[str] = ..., feature_names: _Optional[_Iterable[str]] = ..., catalogue_items: _Optional[int] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., providers: _Optional[_Iterable[str]] = ..., baseline: _Optional[str] = ..., pinned: _Optional[bool] = ...) -> None: ...

class ExperimentInfo(_message.Message):
    __slots__ = ("path", "config_version", "loaded_at", "last_error", "last_error_at", "refused", "name")
    PATH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_AT_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    path: str
    config_version: str
    loaded_at: _timestamp_pb2.Timestamp
    last_error: str
    last_error_at: _timestamp_pb2.Timestamp
    refused: int
    name: str
    def __init__(self, path: _Optional[str] = ..., config_version: _Optional[str] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_error: _Optional[str] = ..., last_error_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., refused: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("variants", "registry", "known_users", "events_applied", "exposures_written", "experiments", "state")
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_FIELD_NUMBER: _ClassVar[int]
    KNOWN_USERS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_APPLIED_FIELD_NUMBER: _ClassVar[int]
    EXPOSURES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    variants: _containers.RepeatedCompositeFieldContainer[VariantInfo]
    registry: str
    known_users: int
    events_applied: int
    exposures_written: int
    experiments: ExperimentInfo
    state: StateInfo
    def __init__(self, variants: _Optional[_Iterable[_Union[VariantInfo, _Mapping]]] = ..., registry: _Optional[str] = ..., known_users: _Optional[int] = ..., events_applied: _Optional[int] = ..., exposures_written: _Optional[int] = ..., experiments: _Optional[_Union[ExperimentInfo, _Mapping]] = ..., state: _Optional[_Union[StateInfo, _Mapping]] = ...) -> None: ...

class StateInfo(_message.Message):
    __slots__ = ("backend", "position", "lag_records", "error", "records_folded", "duplicates_skipped")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    LAG_RECORDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FOLDED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    backend: str
    position: str
    lag_records: int
    error: str
    records_folded: int
    duplicates_skipped: int
    def __init__(self, backend: _Optional[str] = ..., position: _Optional[str] = ..., lag_records: _Optional[int] = ..., error: _Optional[str] = ..., records_folded: _Optional[int] = ..., duplicates_skipped: _Optional[int] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("version", "variant")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    version: str
    variant: str
    def __init__(self, version: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("variant", "previous_version", "model_version", "load_seconds", "pinned")
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    variant: str
    previous_version: str
    model_version: str
    load_seconds: float
    pinned: bool
    def __init__(self, variant: _Optional[str] = ..., previous_version: _Optional[str] = ..., model_version: _Optional[str] = ..., load_seconds: _Optional[float] = ..., pinned: _Optional[bool] = ...) -> None: ...

class ExplainAssignmentRequest(_message.Message):
    __slots__ = ("user_id", "request_id", "context", "request_time")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ContextValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ContextValue, _Mapping]] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TIME_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    request_id: str
    context: _containers.MessageMap[str, ContextValue]
    request_time: _timestamp_pb2.Timestamp
    def __init__(self, user_id: _Optional[str] = ..., request_id: _Optional[str] = ..., context: _Optional[_Mapping[str, ContextValue]] = ..., request_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ExplainAssignmentResponse(_message.Message):
    __slots__ = ("json", "label", "ranker", "config_version")
    JSON_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    RANKER_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    json: str
    label: str
    ranker: str
    config_version: str
    def __init__(self, json: _Optional[str] = ..., label: _Optional[str] = ..., ranker: _Optional[str] = ..., config_version: _Optional[str] = ...) -> None: ...
