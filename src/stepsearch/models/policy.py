"""Policy, critic and reference model for StePPO, with lean per-token scoring.

- Policy: a causal LM loaded by name or path (``models.loading.load_policy``), optionally with LoRA
  adapters (``peft``). Its master weights are what ``dtype`` says (float32 by default: the recipes
  compute in bf16 through autocast or FSDP2's ``MixedPrecisionPolicy``, never by storing bf16).
- Critic: the paper's setting is a separate model — the same base LLM with a scalar value head
  (``critic="separate"``); the cheap option is one trunk with two heads (``critic="shared"``), where
  the value head reads the policy's last hidden state and the value loss also trains the trunk.
  Value heads always run in float32 (autocast off), whatever the trunk computes in.
- Reference: the frozen initial policy. With LoRA it is the same model with adapters disabled (no
  second copy in memory); otherwise a frozen copy of the policy *as loaded from its source*, made
  at construction (before any checkpoint is restored). It is deliberately not a registered
  submodule: it never enters a checkpoint, and a resumed run rebuilds it from the source, the same.
- Lean scoring (departure from a plain ``model(...).logits``): the trunk's hidden states are taken
  at the scored positions only (policy tokens; for values also the value mask), and the LM head +
  log-softmax run over chunks of ``logprob_chunk_tokens`` positions, temperature applied inside the
  chunk, each chunk under activation checkpointing when gradients are needed. So no ``[B, L, V]``
  logits tensor ever exists, and prompt/``<information>`` positions never reach the LM head.
  Entropy is computed with gradient only when asked (entropy coefficient ≠ 0), else detached.
- Initialisation: value heads draw from their own generator seeded by ``seed`` (never the global
  RNG), so a run's update does not depend on what ran in the process before.
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
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stepsearch.errors import StepSearchError
from stepsearch.models.loading import load_policy, resolve_dtype
from stepsearch.models.sharded_generation import FullWeightsForGeneration, reshard_after_generation


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
        dtype: dtype of the trained (master) weights: ``float32`` (recipes; bf16 compute comes from
            the trainer's ``bf16-mixed`` or FSDP2 mixed precision), ``bfloat16`` only with an
            optimizer that handles low-precision weights (see ``OptimSettings``).
        reference_dtype: dtype of the frozen reference (default: ``dtype``); ``bfloat16`` halves it.
        compute_dtype: FSDP2 parameter/compute dtype (``auto``: bfloat16 on CUDA, float32 on CPU);
            gradients are reduced and the optimizer steps in the master dtype.
        gradient_checkpointing: trade compute for activation memory on long trajectories.
        logprob_chunk_tokens: positions per LM-head chunk in scoring (bounds the logits temporaries).
        lora: LoRA adapters on the policy; ``None`` trains all weights.
    """

    name_or_path: str = "runs/quickstart/sft"
    critic: str = "separate"
    critic_name_or_path: str | None = None
    dtype: str = "float32"
    reference_dtype: str | None = None
    compute_dtype: str = "auto"
    gradient_checkpointing: bool = False
    logprob_chunk_tokens: int = 1024
    lora: LoraSettings | None = None


class ValueHead(nn.Module):
    """Scalar head on a hidden state, in float32. Small init so early values stay near 0 (the score
    scale), drawn from a generator seeded by ``seed`` (not the global RNG)."""

    def __init__(self, hidden_size: int, seed: int = 0):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(self.linear.weight.shape, generator=generator) / (hidden_size + 1))
            self.linear.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            # sum over the size-1 dim, not squeeze: a new tensor, not a view (FSDP2's backward hook
            # on a module's output is lost on views modified in place)
            return self.linear(hidden.float()).sum(-1)


def _trunk_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder trunk, LM head) of a causal LM, through a PEFT wrapper (LoRA layers are in place)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return base.get_decoder(), base.get_output_embeddings()


def select_hidden(trunk: nn.Module, input_ids, attention_mask, masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Last hidden states at the positions of each ``[B, L-1]`` mask (column ``j`` = state at ``j``),
    flattened row-major to ``[N_k, H]``."""
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[:, :-1]
    return [hidden[m.bool()] for m in masks]


def chunked_logprobs(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, temperature: float = 1.0,
                     chunk_tokens: int = 1024, entropy: str = "none") -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(head(h) / T)[label] for ``[N, H]`` hidden states and ``[N]`` labels, ``chunk_tokens``
    rows at a time (float32 logits per chunk; the chunk is recomputed in backward instead of kept).

    ``entropy``: ``none``, ``grad`` (differentiable) or ``detached`` (for logging only).
    """
    weight, bias = head.weight, getattr(head, "bias", None)

    def one_chunk(h: torch.Tensor, y: torch.Tensor):
        logits = F.linear(h, weight, bias).float() / temperature
        lse = torch.logsumexp(logits, dim=-1)
        logp = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse
        if entropy == "none":
            return logp, None
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy == "grad"):
            ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        return logp, ent

    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logps, ents = [], []
    for start in range(0, hidden.shape[0], max(chunk_tokens, 1)):
        h, y = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
        logp, ent = checkpoint(one_chunk, h, y, use_reentrant=False) if needs_grad else one_chunk(h, y)
        logps.append(logp)
        ents.append(ent)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if entropy != "none" else None)
    return torch.cat(logps), (torch.cat(ents) if entropy != "none" else None)


class TokenScorer(nn.Module):
    """A causal LM (and optionally a value head on its trunk) scored at masked positions only.

    ``forward(input_ids, attention_mask, target_mask, temperature, entropy, value_mask)`` returns
    ``(logp [N], entropy [N] or None, values [N_v] or None)``: log-probs of token ``j + 1`` at the
    ``[B, L-1]`` mask's positions ``j``. A module (not a function) so that an FSDP2 root wraps the
    whole scoring pass: the LM head's weight is gathered by the root's own forward hooks.
    """

    def __init__(self, lm: nn.Module, chunk_tokens: int = 1024, value_head: ValueHead | None = None):
        super().__init__()
        self.lm = lm
        self.value_head = value_head
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids, attention_mask, target_mask, temperature: float = 1.0, entropy: str = "none",
                value_mask=None):
        trunk, head = _trunk_and_head(self.lm)
        masks = [target_mask] + ([value_mask] if value_mask is not None and self.value_head is not None else [])
        hidden = select_hidden(trunk, input_ids, attention_mask, masks)
        labels = input_ids[:, 1:][target_mask.bool()]
        logp, ent = chunked_logprobs(hidden[0], head, labels, temperature, self.chunk_tokens, entropy)
        values = self.value_head(hidden[1]) if len(hidden) > 1 else None
        return logp, ent, values


class CriticModel(nn.Module):
    """A separate critic: transformer trunk (``AutoModel``) + float32 :class:`ValueHead`."""

    def __init__(self, trunk: nn.Module, hidden_size: int, seed: int = 0):
        super().__init__()
        self.trunk = trunk
        self.value_head = ValueHead(hidden_size, seed=seed)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, value_mask: torch.Tensor | None = None):
        """Values at ``value_mask``'s ``[B, L-1]`` positions (``[N]``), or of tokens 1..L-1 (``[B, L-1]``)."""
        if value_mask is None:
            hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            return self.value_head(hidden)[:, :-1].clone()
        return self.value_head(select_hidden(self.trunk, input_ids, attention_mask, [value_mask])[0])


def scatter_rows(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put ``[N]`` values (row-major over ``mask``) back into a zero ``[B, W]`` float tensor."""
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    return out.index_put((mask.bool().nonzero(as_tuple=True)), flat)


class ActorCritic(nn.Module):
    """Holds policy, critic (or shared value head) and reference; scoring helpers return aligned tensors.

    Args:
        settings: what to load.
        seed: seeds the value head's initialisation (its own generator).
    """

    def __init__(self, settings: PolicySettings, seed: int = 0):
        super().__init__()
        self.settings = settings
        policy, tokenizer = load_policy(
            settings.name_or_path, dtype=settings.dtype, gradient_checkpointing=settings.gradient_checkpointing
        )
        self.tokenizer = tokenizer
        hidden_size = policy.config.hidden_size
        self.uses_lora = settings.lora is not None
        reference = None
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
        else:
            # Copied now, before any checkpoint restore: the reference is the source's weights.
            reference = copy.deepcopy(policy).eval()
            reference.requires_grad_(False)
            if settings.reference_dtype:
                reference.to(resolve_dtype(settings.reference_dtype))
        self.policy = policy
        if settings.gradient_checkpointing:
            checkpointing_mode(policy)
        if settings.critic == "separate":
            trunk, _ = load_policy(settings.critic_name_or_path or settings.name_or_path, dtype=settings.dtype,
                                   gradient_checkpointing=settings.gradient_checkpointing, trunk_only=True)
            if settings.gradient_checkpointing:
                checkpointing_mode(trunk)
            self.critic = CriticModel(trunk, hidden_size, seed=seed)
            self.value_head = None
        elif settings.critic == "shared":
            self.critic = None
            self.value_head = ValueHead(hidden_size, seed=seed)
        else:
            raise StepSearchError(f"model.critic must be 'separate' or 'shared', got {settings.critic!r}")
        chunk = settings.logprob_chunk_tokens
        # Unregistered (object.__setattr__): the scorers reuse the registered policy/value head (no
        # duplicate state-dict keys) and the reference stays out of checkpoints.
        object.__setattr__(self, "policy_scorer", TokenScorer(policy, chunk, self.value_head))
        object.__setattr__(self, "reference", reference)
        object.__setattr__(self, "reference_scorer", TokenScorer(reference, chunk) if reference is not None else None)
        self.sharded = False

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

    # ------------------------------------------------------------------ scoring (lean)
    def policy_logprobs(self, input_ids, attention_mask, target_mask, temperature: float = 1.0,
                        entropy: str = "none", value_mask=None):
        """``(logp [N], entropy [N] | None, shared-head values [N_v] | None)`` at the mask positions."""
        self._leave_generation()
        return self.policy_scorer(input_ids, attention_mask, target_mask, temperature, entropy, value_mask)

    @torch.no_grad()
    def reference_logprobs(self, input_ids, attention_mask, target_mask, temperature: float = 1.0) -> torch.Tensor:
        """``[N]`` log-probs of the frozen initial policy at the mask positions."""
        if self.uses_lora:
            with self.policy.disable_adapter():
                return self.policy_logprobs(input_ids, attention_mask, target_mask, temperature)[0]
        self._follow_device(input_ids.device)
        return self.reference_scorer(input_ids, attention_mask, target_mask, temperature)[0]

    def values(self, input_ids, attention_mask, value_mask) -> torch.Tensor:
        """``[N]`` values at the mask positions (separate critic, or the shared head)."""
        if self.shared_critic:
            return self.policy_logprobs(input_ids, attention_mask, value_mask[:, :0].new_zeros(value_mask.shape),
                                        value_mask=value_mask)[2]
        self._leave_generation()
        return self.critic(input_ids, attention_mask, value_mask)

    def _follow_device(self, device) -> None:
        """The unregistered reference does not move with ``.to()``: follow the inputs (not under FSDP2,
        where it is sharded onto the right device in ``configure_model``)."""
        if self.sharded:
            return
        param = next(self.reference.parameters(), None)
        if param is not None and param.device != device:
            self.reference.to(device)

    # ------------------------------------------------------------------ full-sequence helpers
    def policy_forward(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits[:, :-1], values[:, :-1] or None): full logits for tokens 1..L-1 (tests,
        debugging; training uses :meth:`policy_logprobs`)."""
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask,
                          output_hidden_states=self.shared_critic, use_cache=False)
        values = self.value_head(out.hidden_states[-1])[:, :-1] if self.shared_critic else None
        return out.logits[:, :-1], values

    def critic_values(self, input_ids, attention_mask) -> torch.Tensor:
        """Values of tokens 1..L-1 (``[B, L-1]``): the estimate of the state before each token."""
        if self.shared_critic:
            return self.policy_forward(input_ids, attention_mask)[1]
        return self.critic(input_ids, attention_mask)

    @torch.no_grad()
    def reference_logits(self, input_ids, attention_mask) -> torch.Tensor:
        """Full logits of the frozen initial policy for tokens 1..L-1."""
        with self._reference_context() as ref:
            return ref(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]

    @contextlib.contextmanager
    def _reference_context(self):
        if self.uses_lora:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            self._follow_device(input_device(self.policy))
            yield self.reference

    # ------------------------------------------------------------------ generation / export
    def generation_model(self) -> nn.Module:
        """The module the rollout engine generates with (the live policy, updated in place by PPO).
        Under FSDP2 a wrapper that gathers the full weights once per rollout (see ``models.sharded_generation``)."""
        if self.sharded:
            return FullWeightsForGeneration(self)
        return self.policy

    def _leave_generation(self) -> None:
        if self.sharded:
            reshard_after_generation(self)

    def gather_policy_state(self) -> dict | None:
        """Under FSDP2, the policy's full state dict on rank 0 (CPU; a collective: call on every rank);
        ``None`` when not sharded (``save_policy`` reads the module itself)."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        reshard_after_generation(self)
        return get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_policy(self, out_dir, full_state: dict | None = None) -> None:
        """Write the trained policy and its tokenizer as a Hugging Face model directory (LoRA merged
        into a copy of the base), loadable by ``from_pretrained`` and ``python -m stepsearch evaluate``.
        ``full_state``: the gathered weights of a sharded policy (:meth:`gather_policy_state`)."""
        if full_state is not None:
            if self.uses_lora:
                raise StepSearchError("exporting a LoRA policy trained under FSDP2 is not supported; "
                                      "convert the distributed checkpoint instead")
            self.policy.save_pretrained(out_dir, state_dict=full_state)
            self.tokenizer.save_pretrained(out_dir)
            return
        model = copy.deepcopy(self.policy).merge_and_unload() if self.uses_lora else self.policy
        model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)


def input_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


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
