"""Policy, critic and reference model for StePPO.

- Policy: a causal LM loaded by name or path (``models.loading.load_policy``), optionally with LoRA
  adapters (``peft``).
- Critic: the paper's setting is a separate model — the same base LLM with a scalar value head
  (``critic="separate"``); the cheap option is one trunk with two heads (``critic="shared"``), where
  the value head reads the policy's last hidden state and the value loss also trains the trunk.
- Reference: the frozen initial policy. With LoRA it is the same model with adapters disabled (no
  second copy in memory); otherwise a frozen deep copy.
- Activation checkpointing: Hugging Face layers apply it only in train mode, so with
  ``gradient_checkpointing`` the policy and critic are kept in train mode with dropout rates set to
  0 (otherwise everything stays in eval mode); either way PPO forwards are deterministic.

Token alignment used everywhere in training: quantities of the token at position ``i`` (its
log-prob, its value, its reward) live in column ``i - 1`` of a ``[B, L-1]`` tensor — the log-prob of
token ``i`` comes from the logits at ``i - 1``, and the value of token ``i`` is the critic's estimate
of the state *before* generating it (the hidden state at ``i - 1``).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from stepsearch.errors import StepSearchError


@dataclass
class LoraSettings:
    """LoRA adapters on the policy (``peft``). The reference policy is the base with adapters off."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class PolicySettings:
    """Which models to load and how.

    Args:
        name_or_path: Hugging Face model id or local directory of the policy (e.g. ``Qwen/Qwen2.5-3B``).
        critic: ``separate`` (paper: same base + scalar head, own optimizer) or ``shared`` (one trunk,
            two heads; cheaper, value loss also trains the trunk).
        critic_name_or_path: base of the separate critic; defaults to ``name_or_path``.
        dtype: parameter dtype (``float32``, ``bfloat16``, ``float16``).
        gradient_checkpointing: trade compute for activation memory on long trajectories.
        lora: LoRA adapters on the policy; ``None`` trains all weights.
    """

    name_or_path: str = "runs/quickstart/sft"
    critic: str = "separate"
    critic_name_or_path: str | None = None
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    lora: LoraSettings | None = None


class ValueHead(nn.Module):
    """Scalar head on a hidden state. Small init so early values stay near 0 (the score scale)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


class CriticModel(nn.Module):
    """A separate critic: transformer trunk (``AutoModel``) + :class:`ValueHead`."""

    def __init__(self, trunk: nn.Module, hidden_size: int):
        super().__init__()
        self.trunk = trunk
        self.value_head = ValueHead(hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.value_head(hidden)


class ActorCritic(nn.Module):
    """Holds policy, critic (or shared value head) and reference; forward helpers return aligned tensors."""

    def __init__(self, settings: PolicySettings):
        super().__init__()
        from stepsearch.models.loading import load_policy

        self.settings = settings
        policy, tokenizer = load_policy(
            settings.name_or_path, dtype=settings.dtype, gradient_checkpointing=settings.gradient_checkpointing
        )
        self.tokenizer = tokenizer
        hidden_size = policy.config.hidden_size
        self.uses_lora = settings.lora is not None
        if self.uses_lora:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as err:  # pragma: no cover - peft is a dependency
                raise StepSearchError("LoRA needs `peft`: pip install peft") from err
            lora = settings.lora
            policy = get_peft_model(
                policy,
                LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=list(lora.target_modules), task_type="CAUSAL_LM"),
            )
            self.reference = None
        else:
            self.reference = copy.deepcopy(policy).eval()
            self.reference.requires_grad_(False)
        self.policy = policy
        if settings.gradient_checkpointing:
            checkpointing_mode(policy)
        if settings.critic == "separate":
            trunk = load_trunk(settings.critic_name_or_path or settings.name_or_path, dtype=settings.dtype,
                               gradient_checkpointing=settings.gradient_checkpointing)
            self.critic = CriticModel(trunk, hidden_size)
            self.value_head = None
        elif settings.critic == "shared":
            self.critic = None
            self.value_head = ValueHead(hidden_size)
        else:
            raise StepSearchError(f"model.critic must be 'separate' or 'shared', got {settings.critic!r}")

    @property
    def shared_critic(self) -> bool:
        return self.critic is None

    def actor_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.shared_critic:
            params += list(self.value_head.parameters())
        return params

    def critic_parameters(self) -> list[nn.Parameter]:
        return [] if self.shared_critic else [p for p in self.critic.parameters() if p.requires_grad]

    def policy_forward(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits[:, :-1], values[:, :-1] or None): logits/values for tokens 1..L-1."""
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask,
                          output_hidden_states=self.shared_critic, use_cache=False)
        values = self.value_head(out.hidden_states[-1])[:, :-1] if self.shared_critic else None
        return out.logits[:, :-1], values

    def critic_values(self, input_ids, attention_mask) -> torch.Tensor:
        """Values of tokens 1..L-1 (``[B, L-1]``): the estimate of the state before each token."""
        if self.shared_critic:
            return self.policy_forward(input_ids, attention_mask)[1]
        return self.critic(input_ids, attention_mask)[:, :-1]

    @torch.no_grad()
    def reference_logits(self, input_ids, attention_mask) -> torch.Tensor:
        """Logits of the frozen initial policy for tokens 1..L-1."""
        with self._reference_context() as ref:
            return ref(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]

    @contextlib.contextmanager
    def _reference_context(self):
        if self.uses_lora:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield self.reference

    def generation_model(self) -> nn.Module:
        """The module the rollout engine generates with (the live policy, updated in place by PPO)."""
        return self.policy

    def save_policy(self, out_dir) -> None:
        """Write the trained policy and its tokenizer as a Hugging Face model directory (LoRA merged
        into a copy of the base), loadable by ``from_pretrained`` and ``python -m stepsearch evaluate``."""
        model = copy.deepcopy(self.policy).merge_and_unload() if self.uses_lora else self.policy
        model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)


def checkpointing_mode(model: nn.Module) -> None:
    """Train mode, so Hugging Face layers apply activation checkpointing (they do only when
    ``training``), with every dropout rate set to 0: PPO ratios need deterministic forwards, as in
    eval mode (the rollout engine generates in eval mode and then restores train mode)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def load_trunk(name_or_path: str, dtype: str = "float32", gradient_checkpointing: bool = False) -> nn.Module:
    """The transformer trunk (no LM head) of a causal-LM checkpoint, for the separate critic."""
    import os

    from transformers import AutoModel

    offline = any(os.environ.get(v) == "1" for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    try:
        trunk = AutoModel.from_pretrained(name_or_path, dtype=getattr(torch, dtype), local_files_only=offline)
    except OSError as err:
        raise StepSearchError(f"cannot load critic base {name_or_path!r}: {err}".splitlines()[0]) from None
    if gradient_checkpointing:
        if hasattr(trunk, "activation_checkpointing_enable"):  # transformers >= 5.x name
            trunk.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        checkpointing_mode(trunk)
    return trunk
