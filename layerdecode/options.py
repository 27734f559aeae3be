"""GenerationOptions: the one carrier of sampling, penalty, seed, length and stop settings.

Every face derives its options from this class: the CLI's flags (help text from the field
descriptions, ranges from the constraints), a preset's ``generation:`` block, eval's
options, the Python API's ``options=`` and keyword arguments. Adding an option is one
field here, plus what it does in :meth:`GenerationOptions.sampler` or the loops.

Every field is optional: ``None`` means "not set", so options can be layered (a preset's
defaults under the user's choices) with :meth:`GenerationOptions.over`.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError, did_you_mean

DEFAULT_MAX_TOKENS = 256


class GenerationOptions(BaseModel):
    """How tokens are sampled and when generation ends (strategy aside).

    Unset fields (``None``) fall back to a preset's defaults, then to greedy decoding of
    up to 256 tokens without penalties or stop sequences.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    temp: float | None = Field(None, ge=0.0, description="Sampling temperature; 0 is greedy.")
    top_p: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling: keep the smallest set of tokens with this probability "
        "mass (with a temperature).",
    )
    min_p: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Min-p sampling threshold, relative to the top token (with a temperature).",
    )
    top_k: int | None = Field(
        None, ge=0, description="Sample among the k most likely tokens; 0 is off."
    )
    repetition_penalty: float | None = Field(
        None, gt=0.0, description="Penalty for tokens already seen; 1.0 is off."
    )
    repetition_context_size: int | None = Field(
        None, ge=1, description="Tokens the repetition penalty looks back over (default 20)."
    )
    presence_penalty: float | None = Field(
        None, description="Subtracted from the logit of every token already seen; 0 is off."
    )
    presence_context_size: int | None = Field(
        None, ge=1, description="Tokens the presence penalty looks back over (default 20)."
    )
    frequency_penalty: float | None = Field(
        None,
        description="Subtracted from a token's logit once per time it was seen; 0 is off.",
    )
    frequency_context_size: int | None = Field(
        None, ge=1, description="Tokens the frequency penalty looks back over (default 20)."
    )
    logit_bias: dict[int, float] | None = Field(
        None,
        description="Added to the logits of these tokens, as TOKEN_ID=BIAS (repeatable); "
        "-100 all but bans a token.",
    )
    seed: int | None = Field(None, description="Random seed, for reproducible sampling.")
    max_tokens: int | None = Field(
        None, ge=-1, description="Maximum number of tokens to generate (default 256)."
    )
    stop: tuple[str, ...] | None = Field(
        None,
        description="Stop sequences: generation ends when the text reaches one; the stop "
        "sequence is not returned and the finish reason is 'stop'.",
    )

    @field_validator("max_tokens")
    @classmethod
    def _positive_or_unlimited(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be positive (or -1 for no limit)")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_pairs(cls, value: Any) -> Any:
        """``{id: bias}`` (JSON's string keys too) or ``["ID=BIAS", ...]``."""
        if isinstance(value, (list, tuple)):
            pairs = {}
            for item in value:
                token, sep, bias = str(item).partition("=")
                if not sep:
                    raise ValueError(f"give TOKEN_ID=BIAS, not {item!r}")
                pairs[token.strip()] = bias.strip()
            value = pairs
        if isinstance(value, Mapping):
            out = {}
            for token, bias in value.items():
                try:
                    token_id = int(token)
                    out[token_id] = float(bias)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{token!r}: {bias!r} is not a token id and a number"
                    ) from None
                if token_id < 0:
                    raise ValueError(f"token ids are not negative: {token_id}")
            value = out or None
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, tuple):
            if any(not isinstance(s, str) or not s for s in value):
                raise ValueError("stop sequences must be non-empty strings")
            value = tuple(dict.fromkeys(value)) or None
        return value

    @classmethod
    def build(
        cls, options: GenerationOptions | Mapping[str, Any] | None = None, **overrides: Any
    ) -> GenerationOptions:
        """Options from an object or mapping plus keyword overrides (``None`` ignored).

        Raises :class:`~layerdecode.errors.ConfigError` with one line for a bad value or
        an unknown option.
        """
        if isinstance(options, GenerationOptions):
            values = options.set_values()
        elif options is None:
            values = {}
        elif isinstance(options, Mapping):
            values = {k: v for k, v in options.items() if v is not None}
        else:
            raise ConfigError(
                f"options must be GenerationOptions or a mapping, got {type(options).__name__}."
            )
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            hint = did_you_mean(unknown[0], cls.model_fields)
            raise ConfigError(
                f"Unknown generation options: {', '.join(unknown)}.{hint}"
                f" Known: {', '.join(cls.model_fields)}."
            )
        try:
            return cls(**values)
        except ValidationError as e:
            err = e.errors()[0]
            name = err["loc"][0] if err["loc"] else "?"
            raise ConfigError(
                f"Invalid generation option {name}={err.get('input')!r}: {err['msg']}."
            ) from None

    def set_values(self) -> dict[str, Any]:
        """The options that are set, as plain values."""
        return self.model_dump(mode="json", exclude_none=True)

    def over(self, defaults: GenerationOptions | None) -> GenerationOptions:
        """These options, with unset ones taken from ``defaults`` (e.g. a preset's)."""
        if defaults is None:
            return self
        return type(self)(**{**defaults.set_values(), **self.set_values()})

    def max_tokens_or_default(self) -> int:
        return self.max_tokens if self.max_tokens is not None else DEFAULT_MAX_TOKENS

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return self.stop or ()

    def sampler(self) -> Callable | None:
        """mlx-lm's sampler for these settings, or ``None`` for greedy decoding."""
        if not self.temp:
            return None
        from mlx_lm.sample_utils import make_sampler

        return make_sampler(
            temp=self.temp,
            top_p=self.top_p or 0.0,
            min_p=self.min_p or 0.0,
            top_k=self.top_k or 0,
        )

    def keyed_sampler(self) -> Callable | None:
        """The sampler of :meth:`sampler` drawing from a given key: ``f(logprobs, key)``.

        mlx-lm's filters (top-p, min-p, top-k) and categorical draw, with the key passed in
        rather than MLX's global random state: a seeded row draws the same tokens alone or
        in a batch. ``None`` for greedy decoding.
        """
        if not self.temp:
            return None
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        temp, top_p, min_p, top_k = self.temp, self.top_p or 0.0, self.min_p or 0.0, self.top_k
        filters = []
        if 0 < top_p < 1.0:
            filters.append(lambda x: apply_top_p(x, top_p))
        if min_p:
            filters.append(lambda x: apply_min_p(x, min_p))
        if top_k:
            filters.append(lambda x: apply_top_k(x, top_k))

        def sampler(logprobs, key):
            for method in filters:
                logprobs = method(logprobs)
            return mx.random.categorical(logprobs * (1.0 / temp), key=key)

        return sampler

    def logits_processors(self) -> list[Callable]:
        """mlx-lm's logits processors for these settings (logit bias, then the repetition,
        presence and frequency penalties)."""
        repetition = self.repetition_penalty if self.repetition_penalty != 1.0 else None
        presence = self.presence_penalty or None
        frequency = self.frequency_penalty or None
        if not (self.logit_bias or repetition or presence or frequency):
            return []
        from mlx_lm.sample_utils import make_logits_processors

        return make_logits_processors(
            logit_bias=self.logit_bias,
            repetition_penalty=repetition,
            repetition_context_size=self.repetition_context_size or 20,
            presence_penalty=presence,
            presence_context_size=self.presence_context_size or 20,
            frequency_penalty=frequency,
            frequency_context_size=self.frequency_context_size or 20,
        )

    def seed_random(self) -> None:
        """Seed MLX's random state when a seed is set."""
        if self.seed is not None:
            import mlx.core as mx

            mx.random.seed(self.seed)


@dataclass(frozen=True)
class OptionField:
    """One generation option as a face shows it (a CLI flag, a request field).

    Attributes:
        name: the field name (``repetition_penalty``).
        flag: the command-line flag (``--repetition-penalty``).
        type: ``float``, ``int`` or ``str``.
        multiple: whether several values make a list (``--stop``).
        minimum, maximum: bounds, ``None`` when open-ended.
        min_open, max_open: whether a bound is excluded.
        help: the field description.
    """

    name: str
    flag: str
    type: type
    multiple: bool
    minimum: float | None
    maximum: float | None
    min_open: bool
    max_open: bool
    help: str


def option_fields() -> list[OptionField]:
    """Every generation option, described for the faces (CLI flags, server fields)."""
    out = []
    for name, field in GenerationOptions.model_fields.items():
        kind = next(a for a in typing.get_args(field.annotation) if a is not type(None))
        multiple = typing.get_origin(kind) in (tuple, dict)
        if multiple:  # a list of values, or of KEY=VALUE pairs for a mapping
            kind = str if typing.get_origin(kind) is dict else typing.get_args(kind)[0]
        bounds: dict[str, Any] = {"ge": None, "gt": None, "le": None, "lt": None}
        for item in field.metadata:
            for key in bounds:
                if getattr(item, key, None) is not None:
                    bounds[key] = getattr(item, key)
        out.append(
            OptionField(
                name=name,
                flag="--" + name.replace("_", "-"),
                type=kind,
                multiple=multiple,
                minimum=bounds["gt"] if bounds["gt"] is not None else bounds["ge"],
                maximum=bounds["lt"] if bounds["lt"] is not None else bounds["le"],
                min_open=bounds["gt"] is not None,
                max_open=bounds["lt"] is not None,
                help=field.description or "",
            )
        )
    return out
