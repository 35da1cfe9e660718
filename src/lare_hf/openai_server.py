"""`lare serve`: a LaRe checkpoint behind an OpenAI-compatible API (`/v1/chat/completions`, `/v1/responses`), built
from transformers' own server (`transformers serve`, transformers/cli/serving) with the pieces that keep LaRe out of
it replaced. transformers 5.25 restructured that server (each model runs in a process of its own, see
`MODEL_PROCESS`); the same problems are in both layouts, fixed in the class each layout has them in
(5.23 | 5.25):

- Loading (`ModelManager._load_model` | `ModelLoader._load_model`) instantiates
  `getattr(transformers, config.architectures[0])`, a class that must live in the transformers namespace: a LaRe
  checkpoint fails with "module transformers has no attribute LaReForConditionalGeneration", installed package or
  `--trust-remote-code` alike. `LaReModelManager` | `LaReModelLoader` loads it with `AutoModelForImageTextToText`,
  where lare_hf registers it (or the checkpoint's `auto_map` points).
- The modality (`ModelManager.get_model_modality` | `ModelLoader.get_model_modality`, read by
  `EngineClient.modality`) is looked up by class name in transformers' static name tables
  (`MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`, ...), which registered models are not in: "Unknown modality".
  `LaReModelManager` | `LaReEngineClient` answers `Modality.VLM`, so `image_url` parts reach the processor.
- `BaseHandler.get_processor_inputs_from_messages` (both) hands an image URL to `load_image`, which also opens local
  file paths on the server and whose failures (bad base64, bytes that are no image) surface as 500 errors.
  `LaReRequestsMixin` decodes `data:` URLs itself (http(s) URLs through `load_image`), refuses anything else, and
  answers every bad image, bad K and invalid message with a 400 that says what to fix.
- Generation (`GenerateManager.generate_streaming` / `generate_non_streaming` | `GenerateRunner.generate`) passes
  the processor as `generate(tokenizer=...)`, which `stop` strings need to be a tokenizer (`StopStringCriteria`
  calls `get_vocab`): a request with `stop` fails for any processor-backed model. `LaReGenerateManager` |
  `LaReModelLoader.load_model_and_processor` hands it the processor's tokenizer.
- `/v1/models` (`ModelManager.get_gen_models` | `ModelManager.list_models`) lists the models of the local Hub cache
  or the checkpoint path; `LaReModelManager` lists the served checkpoint under its served name.

Everything else (generation on a dedicated thread through `model.generate()`, streaming, the OpenAI response
formats, `max_tokens`, `temperature`, `stop`, `seed`) is transformers'. K (the number of latent refocusing steps) is
the checkpoint processor's unless a request sets `"chat_template_kwargs": {"num_latent_steps": K}`: the prompt is
then rendered with K*m latent slots, as `apply_chat_template(..., num_latent_steps=K)` does offline.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
from pathlib import Path

from .destinations import check_lare_checkpoint

try:
    from fastapi import HTTPException
    from PIL import Image
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import BaseHandler, GenerationState, Modality
    from transformers.image_utils import load_image
except ImportError as error:  # fastapi / uvicorn / openai are not installed
    raise ImportError(
        f"`lare serve` needs transformers' serving dependencies ({error}); install them with "
        '`pip install "lare-hf[serving]"` (or `pip install "transformers[serving]"`).'
    ) from error

# transformers 5.25 runs each served model in a process of its own: `ModelLoader` loads it there, an `EngineClient`
# sends it the requests, and `GenerateRunner` calls `generate()` (transformers/cli/serving/model_manager.py). In 5.23
# the model lives in the server's process, loaded by `ModelManager` and run by `GenerateManager`. The same four
# pieces are replaced in both (see the module docstring); which layout is installed is read from what it defines.
try:
    from transformers.cli.serving.model_manager import EngineClient, ModelLoader
    from transformers.cli.serving.utils import canonical_model_id, parse_model_id

    MODEL_PROCESS = True
except ImportError:
    from transformers.cli.serving.utils import GenerateManager

    MODEL_PROCESS = False

IMAGE_FETCH_TIMEOUT_S = 10.0


def _bad_request(message: str) -> HTTPException:
    return HTTPException(status_code=400, detail=message)


def load_request_image(url) -> Image.Image:
    """The image of an `image_url` part: a `data:image/...;base64,...` URL decoded here, an http(s) URL fetched by
    transformers' `load_image`; local paths are refused (a client must not read the server's files). Orientation and
    mode are normalised as `load_image` does (EXIF transpose, RGB)."""
    if not isinstance(url, str):
        raise _bad_request(f"image_url must be a string URL, got {type(url).__name__}.")
    if url.startswith(("http://", "https://")):
        try:
            return load_image(url, timeout=IMAGE_FETCH_TIMEOUT_S)
        except Exception as error:
            raise _bad_request(f"The image at {url[:200]!r} could not be fetched or read: {error}") from None
    if not url.startswith("data:"):
        raise _bad_request(
            f"image_url {url[:60]!r} is neither a data URL (data:image/png;base64,...) nor an http(s) URL; the server "
            "does not read local paths. Send the image base64-encoded in a data URL."
        )
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise _bad_request(
            f"image_url data URL must be `data:image/<format>;base64,<data>`, got a header {header[:60]!r}."
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise _bad_request(
            f"image_url holds invalid base64 data ({error}); encode the image bytes with base64."
        ) from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:  # PIL's UnidentifiedImageError, truncated files, decompression bombs
        raise _bad_request(
            f"image_url decodes to {len(data)} bytes that are not an image PIL can read ({type(error).__name__}: "
            f"{error}); send a PNG, JPEG, WebP, ... file."
        ) from None
    return load_image(image)


def _served_model_entry(name: str) -> dict:
    """The one `/v1/models` entry: the served checkpoint."""
    return {"id": name, "object": "model", "owned_by": "lare_hf", "created": int(time.time())}


if MODEL_PROCESS:  # transformers 5.25

    class LaReModelLoader(ModelLoader):
        """transformers' `ModelLoader` (a copy of it loads the model in the model's process), loading LaRe through
        the Auto class it is registered with, in place of `getattr(transformers, config.architectures[0])`."""

        def _load_model(self, model_id: str, tqdm_class=None, progress_callback=None):
            from transformers import AutoModelForImageTextToText

            import lare_hf  # noqa: F401  (registers the "lare" Auto classes in the model's process)

            repo, revision, _ = parse_model_id(model_id)
            if progress_callback is not None:
                progress_callback({"status": "loading", "model": model_id, "stage": "config"})
            return AutoModelForImageTextToText.from_pretrained(
                repo,
                revision=revision,
                attn_implementation=self.attn_implementation,
                dtype=self.dtype,
                device_map=self.device,
                trust_remote_code=self.trust_remote_code,
                quantization_config=self.get_quantization_config(),
                tqdm_class=tqdm_class,
            ).eval()

        def load_model_and_processor(self, model_id: str, on_progress=None):
            """The model and, for the model's process, the processor's tokenizer: there `GenerateRunner.generate`
            only hands it to `generate(tokenizer=...)`, which `stop` strings need to be a tokenizer. The server's
            process keeps the whole processor (`load_processor`) for the chat template and decoding."""
            model, processor = super().load_model_and_processor(model_id, on_progress)
            return model, getattr(processor, "tokenizer", processor)

    class LaReEngineClient(EngineClient):
        """transformers' `EngineClient`, reporting LaRe as the vision-language model it is: `EngineClient.modality`
        asks `ModelLoader.get_model_modality`, whose static name tables registered models are not in."""

        @property
        def modality(self) -> Modality:
            return Modality.VLM

    class LaReModelManager(ModelManager):
        """transformers' `ModelManager` serving one LaRe checkpoint through a `LaReEngineClient`, listing it in
        `/v1/models`. `served_model_name`: the name requests may give as `model` besides the checkpoint path (not in
        transformers)."""

        def __init__(self, *args, served_model_name: str | None = None, **kwargs):
            self.served_model_name = served_model_name or kwargs.get("force_model")
            super().__init__(*args, **kwargs)  # starts the model's process

        def preload_engine(self, force_model: str, engine_connection: tuple | None) -> None:
            # as `ModelManager.preload_engine`, with LaRe's engine client
            model_id = canonical_model_id(force_model)
            engine = LaReEngineClient(model_id, self.loader, self.generation_state, connection=engine_connection)
            self.engines[model_id] = engine
            if engine_connection is None:
                engine.start()

        def get_engine(self, model: str | None) -> EngineClient:
            return super().get_engine(self.force_model if model == self.served_model_name else model)

        def list_models(self, cache_dir: str | None = None) -> list[dict]:
            return [_served_model_entry(self.served_model_name)]

else:  # transformers 5.23

    class LaReModelManager(ModelManager):
        """transformers' `ModelManager`, loading LaRe through the Auto class it is registered with and reporting it
        as the vision-language model it is (see the module docstring for the transformers code this replaces).
        `served_model_name`: the name requests may give as `model` besides the checkpoint path (not in
        transformers)."""

        def __init__(self, *args, served_model_name: str | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.served_model_name = served_model_name or self.force_model

        def _load_model(self, model_id_and_revision, tqdm_class=None, progress_callback=None, gguf_file=None):
            from transformers import AutoModelForImageTextToText

            import lare_hf  # noqa: F401  (registers the "lare" Auto classes)

            model_id, revision = model_id_and_revision.split("@", 1)
            if progress_callback is not None:
                progress_callback({"status": "loading", "model": model_id_and_revision, "stage": "config"})
            return AutoModelForImageTextToText.from_pretrained(
                model_id,
                revision=revision,
                attn_implementation=self.attn_implementation,
                dtype=self.dtype,
                device_map=self.device,
                trust_remote_code=self.trust_remote_code,
                quantization_config=self.get_quantization_config(),
            ).eval()

        @staticmethod
        def get_model_modality(model, processor=None) -> Modality:
            return Modality.VLM

        def get_gen_models(self, cache_dir: str | None = None) -> list[dict]:
            return [_served_model_entry(self.served_model_name)]

    class LaReGenerateManager(GenerateManager):
        """transformers' sequential `GenerateManager`, given the processor's tokenizer where it hands the processor
        to `generate(tokenizer=...)` (for `stop` strings) and decodes with it (the same text: the processor decodes
        with its tokenizer)."""

        def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
            tokenizer = getattr(processor, "tokenizer", processor)
            return super().generate_streaming(model, tokenizer, inputs, gen_config, request_id, response_parser)

        async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
            tokenizer = getattr(processor, "tokenizer", processor)
            return await super().generate_non_streaming(model, tokenizer, inputs, gen_config, request_id)

    class LaReGenerationState(GenerationState):
        """transformers' `GenerationState` whose per-model managers are `LaReGenerateManager`s (LaRe runs without
        continuous batching: its prefill is the latent loop)."""

        def get_manager(self, model_id: str, use_cb: bool = False):
            if not use_cb and model_id not in self._generate_managers:
                self._generate_managers[model_id] = LaReGenerateManager()
            return super().get_manager(model_id, use_cb=use_cb)


class LaReRequestsMixin:
    """Request handling of LaRe's chat endpoints: images decoded (or refused with a 400) before the processor sees
    them, K checked against the model, and invalid messages answered with a 400 naming the problem."""

    @staticmethod
    def get_processor_inputs_from_messages(messages: list[dict], modality: Modality) -> list[dict]:
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise _bad_request(
                "`messages` must be a non-empty list of message objects ({'role': ..., 'content': ...})."
            )
        for message in messages:
            content = message.get("content")
            if isinstance(content, list) and not all(isinstance(part, dict) and "type" in part for part in content):
                raise _bad_request("Each content part of a message must be an object with a `type`.")
        parsed = BaseHandler.get_processor_inputs_from_messages(messages, modality)
        for message in parsed:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part.get("type") == "image" and "url" in part:
                    part["image"] = load_request_image(part.pop("url"))
        return parsed

    def _resolve_model(self, body: dict):  # transformers 5.23 (5.25 resolves it in `LaReModelManager.get_engine`)
        if body.get("model") == self.model_manager.served_model_name:
            body["model"] = self.model_manager.force_model
        return super()._resolve_model(body)

    def served_config(self, body: dict):
        """The config of the model `body` asks for (a 400 when the server does not serve it)."""
        if MODEL_PROCESS:
            return self.model_manager.get_engine(body.get("model")).model_config
        _, model, _ = self._resolve_model(dict(body))
        return model.config

    def check_latent_steps(self, body: dict) -> None:
        """`chat_template_kwargs.num_latent_steps` (K for this request), when given, is an integer the model allows."""
        template_kwargs = body.get("chat_template_kwargs")
        if template_kwargs is None:
            return
        if not isinstance(template_kwargs, dict):
            raise _bad_request(f"chat_template_kwargs must be an object, got {type(template_kwargs).__name__}.")
        steps = template_kwargs.get("num_latent_steps")
        if steps is None:
            return
        maximum = self.served_config(body).max_latent_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= maximum:
            raise _bad_request(
                f"chat_template_kwargs.num_latent_steps must be an integer between 0 and {maximum} (the model's "
                f"max_latent_steps), got {steps!r}."
            )

    # the request field holding the conversation: "messages" (chat completions) or "input" (responses)
    conversation_field = "messages"

    async def handle_request(self, body: dict, request_id: str):
        if not isinstance(body.get(self.conversation_field), (list, str)):
            raise _bad_request(f"The request needs `{self.conversation_field}`: the conversation to answer.")
        self.check_latent_steps(body)
        try:
            return await super().handle_request(body, request_id)
        except ValueError as error:  # lare_hf's processor and model check what a request gives them
            raise _bad_request(str(error)) from None


class LaReChatCompletionHandler(LaReRequestsMixin, ChatCompletionHandler):
    """`/v1/chat/completions` for LaRe."""


class LaReResponseHandler(LaReRequestsMixin, ResponseHandler):
    """`/v1/responses` for LaRe."""

    conversation_field = "input"


def build_app(
    model: str,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    served_model_name: str | None = None,
):
    """The FastAPI app serving the LaRe checkpoint `model` (loaded now; on transformers 5.25 in a process of its
    own), assembled as transformers' `Serve` (transformers/cli/serve.py) assembles it, with the LaRe model manager
    and chat handlers.
    Requests name the model by `model` or by `served_model_name`."""
    if Path(model).expanduser().exists():
        check_lare_checkpoint(model, "model")
    if MODEL_PROCESS:  # as `Serve.run` assembles it in transformers 5.25
        generation_state = GenerationState()
        loader = LaReModelLoader(device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        model_manager = LaReModelManager(
            loader, generation_state, force_model=model, served_model_name=served_model_name
        )
        transcription_handler = TranscriptionHandler(model_manager)
        server_kwargs = {}
    else:  # as `Serve.__init__` assembles it in transformers 5.23
        model_manager = LaReModelManager(
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            force_model=model,
            served_model_name=served_model_name,
        )
        generation_state = LaReGenerationState()
        transcription_handler = TranscriptionHandler(model_manager, generation_state)
        server_kwargs = {"generation_state": generation_state}
    handler_kwargs = dict(model_manager=model_manager, generation_state=generation_state)
    return build_server(
        model_manager,
        LaReChatCompletionHandler(**handler_kwargs),
        completion_handler=CompletionHandler(**handler_kwargs),
        response_handler=LaReResponseHandler(**handler_kwargs),
        transcription_handler=transcription_handler,
        systemone_handler=SystemOneHandler(**handler_kwargs),
        **server_kwargs,
    )


def serve(
    model: str,
    host: str = "localhost",
    port: int = 8000,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    served_model_name: str | None = None,
    log_level: str = "info",
) -> None:
    """Run the server until interrupted (`lare serve`)."""
    import uvicorn

    app = build_app(
        model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, served_model_name=served_model_name
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = [
    "MODEL_PROCESS",
    "LaReChatCompletionHandler",
    "LaReModelManager",
    "LaReResponseHandler",
    "build_app",
    "load_request_image",
    "serve",
]
