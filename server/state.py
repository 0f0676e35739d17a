"""ServerState: what the routes share (settings, engine, services), kept on `app.state.server`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from model_runtime.engine_client import EngineClient
from server.chat import ChatService
from server.completions import CompletionService
from server.errors import NotFoundError, printable
from server.loop_monitor import LoopLagMonitor
from server.media import MediaFetcher
from server.metrics import Metrics
from server.protocol import ModelCard, ModelList
from server.request_parsing import BodyLimits
from server.responses import ResponseService
from server.settings import Settings
from server.tokens import TokenService


@dataclass
class ServerState:
    """One per app; `draining` flips once, on SIGTERM or shutdown."""

    settings: Settings
    engine: EngineClient
    model_names: list[str]
    metrics: Metrics
    fetcher: MediaFetcher
    chat: ChatService
    completions: CompletionService
    responses: ResponseService
    tokens: TokenService
    loop_lag: LoopLagMonitor
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False

    @property
    def body_limits(self) -> BodyLimits:
        s = self.settings
        return BodyLimits(
            s.max_messages,
            s.max_content_parts,
            s.max_stop_token_ids,
            s.max_text_bytes,
            s.max_tools,
            max_prompt_tokens=self.engine.info.max_model_len,
        )

    @property
    def status(self) -> str:
        """What /health reports: ready, draining, lagging, or the engine's state."""
        if self.draining:
            return "draining"
        if self.engine.health == "ready" and self.loop_lag.lagging:
            return "lagging"
        return self.engine.health

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def model_card(self, name: str) -> ModelCard:
        if name not in self.model_names:
            raise NotFoundError(
                f"The model '{printable(name)[:200]}' does not exist.", param="model", code="model_not_found"
            )
        return ModelCard(
            id=name,
            created=self.created,
            root=self.settings.model or name,
            max_model_len=self.engine.info.max_model_len,
        )

    def model_list(self) -> ModelList:
        return ModelList(data=[self.model_card(name) for name in self.model_names])
