"""The wire: request and response bodies of the gateway."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator

from service.records import AdapterMode, RetrievalMode, RouteMode, Scorer

MAX_ID_LENGTH = 128
MAX_ITEMS_PER_REQUEST = 1000
MAX_EVENTS_PER_REQUEST = 1000


def _int_as_str(value: object) -> object:
    # Ids are strings; integers are accepted as their decimal form. bool is an int in Python: refuse it.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


Id = Annotated[str, BeforeValidator(_int_as_str),
               StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=r"^[^\x00-\x1f\x7f]+$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreOptions(Strict):
    adapter: str | None = Field(None, description='adapter name from the registry, or "base" (no fallback)')
    mode: AdapterMode | None = Field(
        None, description="which adapter: the user's RecLoRA adapter, their cohort's, the shared one, or none; "
                          "default: the deployment's")
    retrieval: RetrievalMode | None = Field(
        None, description="history selection: per-candidate SUBR, the last K, or one SUBR history for the whole "
                          "slate; default: the deployment's")
    k: int | None = Field(None, ge=0, le=50, description="behaviours in each prompt")
    scorer: Scorer | None = Field(
        None, description="who scores: the combination of the LLM and the CRM, the LLM alone, or the CRM alone; "
                          "default: the deployment's (when one cannot serve, the next of hybrid -> crm -> llm "
                          "does and `fallbacks` says why)")
    explain: bool = Field(False, description="include each item's prompt behaviours (why) and each component's "
                                             "score")
    return_prompt: bool = Field(False, description="include each item's prompt token ids (debugging, audits)")
    skip_unknown: bool = Field(False, description="score the known items and list unknown ones in `skipped` "
                                                   "instead of answering 404")


class CtrRequest(Strict):
    user_id: Id
    item_ids: list[Id] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)
    as_of: int | None = Field(None, ge=0, description="see only behaviours strictly before this unix time")
    options: ScoreOptions = Field(default_factory=ScoreOptions)

    @model_validator(mode="after")
    def _unique_items(self) -> CtrRequest:
        if len(set(self.item_ids)) != len(self.item_ids):
            raise ValueError("item_ids must not repeat an id")
        return self


class RankRequest(CtrRequest):
    top_k: int | None = Field(None, ge=1, description="how many items to return; default all")


class BehaviourOut(BaseModel):
    item_id: str
    ts: int
    rating: float | None
    title: str | None = None


class Components(BaseModel):
    llm: float | None = Field(None, description="the LLM's P(Yes)")
    crm: float | None = Field(None, description="the CRM's probability")


class ItemScore(BaseModel):
    item_id: str
    score: float = Field(description="the served probability in [0, 1] (see the response's `scorer`)")
    logprob_yes: float | None = Field(None, description="the LLM's answer log-probabilities, when it scored")
    logprob_no: float | None = None
    components: Components | None = Field(None, description="each component's score (explain)")
    why: list[BehaviourOut] | None = None
    prompt_token_ids: list[int] | None = None


class Fallback(BaseModel):
    mode: str
    reason: str


class ScoreMeta(BaseModel):
    user_id: str
    adapter: str
    adapter_mode: RouteMode = Field(description='personal, cohort, shared, base, "named" (options.adapter), '
                                          '"crm" (no LLM answer: the CRM scored alone) or "none" (nothing to '
                                          'score)')
    scorer: Scorer = Field(description="who scored: hybrid (the combiner over the LLM and the CRM), llm or crm")
    combiner: str | None = Field(None, description="the combiner that combined the scores (scorer hybrid)")
    fallbacks: list[Fallback] | None = Field(None, description="scorers and adapter modes skipped before the "
                                             "ones that served, with the reason")
    retrieval: str
    k: int
    history_size: int
    degraded: list[str] | None = Field(None, description='parts that failed and were stood in for: "retrieval" '
                                       '(recent history used), "llm" (CRM scores)')
    skipped: list[str] | None = Field(None, description="unknown item ids left out (options.skip_unknown)")


class CtrResponse(ScoreMeta):
    scores: list[ItemScore]


class RankResponse(ScoreMeta):
    items: list[ItemScore]


class EventIn(Strict):
    event_id: Id | None = Field(None, description="client's id for the event: a retry with the same id is "
                                                  "stored once")
    user_id: Id
    item_id: Id
    ts: int = Field(ge=0, description="unix time in seconds")
    rating: float | None = Field(None, ge=0, le=10, description="stars; leave out for a click")
    click: bool = False

    @model_validator(mode="after")
    def _rating_or_click(self) -> EventIn:
        if (self.rating is None) == (not self.click):
            raise ValueError("an event is either a rating or a click (click: true), not both or neither")
        return self


class EventsRequest(Strict):
    events: list[EventIn] = Field(min_length=1, max_length=MAX_EVENTS_PER_REQUEST)


class EventsResponse(BaseModel):
    accepted: int = Field(description="events in the request, all written to Redis")
    stored: int = Field(description="of those, how many were new (the rest were retries or repeats)")


class ProfileOut(BaseModel):
    gender: str | None = None
    age: str | None = None
    occupation: str | None = None


class HistoryResponse(BaseModel):
    user_id: str
    profile: ProfileOut
    events: list[BehaviourOut]


class ItemIn(Strict):
    title: str = Field(min_length=1, max_length=500)
    year: int | None = Field(None, ge=1800, le=2200)
    genres: list[Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^|\x00-\x1f]+$")]] \
        = Field(default_factory=list, max_length=32)


class ItemOut(ItemIn):
    item_id: str


class ScorersOut(BaseModel):
    default: str = Field(description="the configured scorer (LOREC_SCORER)")
    serving: str = Field(description="the scorer a request without options.scorer gets")
    crm: str | None = Field(None, description="the CRM (name@version)")
    combiner: str | None = Field(None, description="the combiner in use")
    hybrid_calls_llm: bool | None = Field(None, description="whether the hybrid calls the LLM (false: its combiner "
                                          "kept the CRM alone, the LLM having beaten it on no validation fit)")
    unavailable: dict[str, str] = Field(default_factory=dict, description="scorers that cannot serve, and why "
                                        "(e.g. a combiner refused at start)")


class AdaptersResponse(BaseModel):
    registry: list[str] = Field(description="servable adapters in the registry")
    loaded: list[str] = Field(description="adapters this gateway has loaded into the engine")
    quarantined: list[str] = Field(description="adapters the engine refused; not retried until restart")
    default: str | None
    mode: str
    scorers: ScorersOut


class ErrorBody(BaseModel):
    type: str
    message: str
    code: int
    field: str | None = None
    dependency: str | None = None
    details: list[dict] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
