"""How to train one SAE (the `sae` config group: conf/sae/<architecture>.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from token_journey.errors import TokenJourneyError
from token_journey.sae.registry import USES_K, USES_PREFIXES, check_architecture, check_k, encoder_of, prefix_sizes

B_DEC_INITS = ("mean", "geometric_median", "zeros")
WARMUP_ARCHITECTURES = ("topk", "batchtopk")


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    architecture: str
    """jumprelu | topk | batchtopk | matryoshka | relu, or an MLP transcoder (site mlp_out, reading mlp_in):
    jumprelu_transcoder | jumprelu_skip_transcoder | topk_transcoder | topk_skip_transcoder."""
    name: str
    """Folder name under models/saes/<model>/<site>/layer_<L>/ (sweeps add the swept values)."""
    width: int
    """Number of latents d_sae."""
    k: int
    """Active latents per token for topk/batchtopk/matryoshka; must be 0 for jumprelu/relu, which ignore it."""
    prefixes: tuple[float, ...]
    """matryoshka only: the nested prefixes that each reconstruct, as increasing fractions of the width
    ending with 1 (e.g. [0.0625, 0.125, 0.25, 0.5, 1.0]); must be [] for the other architectures."""
    sparsity_coefficient: float
    """lambda of the L0 (jumprelu) or decoder-norm-weighted L1 (relu) penalty; must be 0 where unused (topk,
    batchtopk, matryoshka). With target_l0, the value the controller starts from."""
    target_l0: float
    """jumprelu only: train to this L0 on held-out rows, lambda set by a controller (token_journey.sae.target_l0; 0 = off)."""
    target_l0_gain: float
    """How fast that controller moves lambda: its log changes by at most this much per step."""
    topk_warmup_fraction: float
    """jumprelu with target_l0 only: the first fraction of the steps trains as TopK with k = target_l0 (a warm
    start: every threshold then starts at the last batch's cut for that L0 and trains on its own; 0 = off)."""
    warmup_architecture: str
    """What the warm start trains as: topk (each token's k = target_l0 largest pre-activations) or batchtopk (the
    k x batch largest of the whole batch, with BatchTopK's loss, its FVU, so a token's L0 varies as a JumpReLU's does,
    and the thresholds' handover cut is the very rule the warm start trained with). Without a warm start
    (topk_warmup_fraction 0) it has no effect, so `sae=jumprelu-l0 sae.topk_warmup_fraction=0` turns the warm start off alone."""
    sparsity_warmup_steps: int
    """Steps over which lambda rises linearly from 0."""
    lr: float
    """Peak Adam learning rate."""
    lr_warmup_steps: int
    """Steps of linear warmup from 0.1 * lr."""
    lr_decay_fraction: float
    """Final fraction of the steps over which lr decays linearly to 0."""
    adam_beta1: float
    """Adam beta1 (Gemma Scope uses 0)."""
    adam_beta2: float
    """Adam beta2."""
    grad_clip: float
    """Max global gradient norm (0 = no clipping)."""
    batch_size: int
    """Tokens per step (the global batch when data-parallel)."""
    train_tokens: int
    """Training budget in tokens; steps = ceil(train_tokens / batch_size)."""
    bandwidth: float
    """JumpReLU straight-through window eps (inputs scaled so E||x||^2 = 1)."""
    threshold_init: float
    """JumpReLU initial threshold."""
    center_encoder_input: bool
    """jumprelu only: while training, the encoder reads x - b_dec, as TopK's and BatchTopK's do, and not x; at the end
    b_dec's part is folded into b_enc (b_enc - b_dec W_enc), so the saved SAE reads x as a Gemma Scope JumpReLU does."""
    pre_act_coefficient: float
    """JumpReLU only: weight of the pre-activation loss, the mean over tokens of sum_i relu(theta_i - z_i), which pulls
    every latent that does not fire towards its threshold so that none stays dead (`JumpReLUSAE._below_threshold`); 0 = off."""
    pre_act_moves_encoder: bool
    """JumpReLU with pre_act_coefficient only: true (Anthropic's form) lets the pre-activation loss move the encoder
    weights too; false moves only b_enc and the thresholds (`JumpReLUSAE._below_threshold`: under Adam the full form
    turns every silent latent's encoder towards minus the mean input, whatever the coefficient)."""
    auxk_alpha: float
    """Weight of the AuxK dead-latent loss (topk/batchtopk/matryoshka)."""
    k_aux: int
    """Dead latents used by AuxK per token."""
    dead_window_tokens: int
    """A latent is dead after this many training tokens without firing."""
    b_dec_init: str
    """mean | geometric_median | zeros: where the decoder bias starts."""
    train_b_dec: bool
    """false keeps b_dec where b_dec_init put it. With the geometric median, that is robust to rows of huge norm
    (a sink token's), whose errors would otherwise drag a trained b_dec off every ordinary row."""
    checkpoint_every: int
    """Save a resumable checkpoint every N steps (0 = never)."""
    checkpoint_minutes: float
    """Also save one every this many minutes of wall time (0 = never), so a preempted run loses at most that
    much whatever a step costs. SIGTERM and SIGUSR1 always save one (token_journey.preemption)."""
    eval_tokens: int
    """Held-out tokens for the final FVU / L0 / dead fraction in train.json."""
    log_every: int
    """Log metrics to wandb and the progress bar every N steps."""
    buffer_rows: int
    """Shuffle buffer of the activation loader, in rows."""

    def __post_init__(self) -> None:
        check_architecture(self.architecture)
        if self.width < 1:
            raise TokenJourneyError(f"sae.width={self.width} must be >= 1")
        check_k(self.architecture, self.k, self.width)
        if self.batch_size < 1 or self.train_tokens < self.batch_size:
            raise TokenJourneyError(f"sae.train_tokens={self.train_tokens} must be >= sae.batch_size={self.batch_size} (>= 1)")
        if self.lr <= 0 or self.bandwidth <= 0:
            raise TokenJourneyError(f"sae.lr={self.lr} and sae.bandwidth={self.bandwidth} must be > 0")
        if self.b_dec_init not in B_DEC_INITS:
            raise TokenJourneyError(f"sae.b_dec_init={self.b_dec_init!r} is not one of {', '.join(B_DEC_INITS)}")
        if self.target_l0 < 0 or self.target_l0 > self.width:
            raise TokenJourneyError(f"sae.target_l0={self.target_l0} must be between 0 (off) and the width {self.width}")
        if self.target_l0 and encoder_of(self.architecture) != "jumprelu":
            fix = "set sae.k instead" if self.architecture in USES_K else "use sae=jumprelu-l0 or tune sae.sparsity_coefficient"
            raise TokenJourneyError(f"sae.target_l0={self.target_l0} applies to jumprelu only, not {self.architecture}; {fix}")
        if self.target_l0 and (self.target_l0_gain <= 0 or self.sparsity_coefficient <= 0):
            raise TokenJourneyError(
                f"sae.target_l0_gain={self.target_l0_gain} and sae.sparsity_coefficient="
                f"{self.sparsity_coefficient} (where the controller starts) must be > 0 when "
                "sae.target_l0 is set; use sae=jumprelu-l0"
            )
        if self.pre_act_coefficient < 0 or (self.pre_act_coefficient and encoder_of(self.architecture) != "jumprelu"):
            raise TokenJourneyError(f"sae.pre_act_coefficient={self.pre_act_coefficient} must be >= 0, and 0 for {self.architecture} (JumpReLU only)")
        if self.center_encoder_input and self.architecture != "jumprelu":
            raise TokenJourneyError(f"sae.center_encoder_input=true applies to jumprelu only, not {self.architecture}; leave it false")
        if self.checkpoint_every < 0 or self.checkpoint_minutes < 0:
            raise TokenJourneyError(f"sae.checkpoint_every={self.checkpoint_every} and sae.checkpoint_minutes={self.checkpoint_minutes} must be >= 0 (0 = off)")
        self._check_sparsity_keys_apply()
        if not self.name or "/" in self.name:
            raise TokenJourneyError(f"sae.name={self.name!r} must be a non-empty folder name without '/'")

    def _check_sparsity_keys_apply(self) -> None:
        """A sparsity key the architecture ignores must hold 0, so a sweep over it is refused, not silent.

        Without this, `dvc exp run --queue -S 'sae.k=16,32,64'` on the default JumpReLU trained three
        identical SAEs. Each preset in conf/sae/ sets the keys its architecture ignores to 0.
        """
        arch = self.architecture
        if arch not in USES_K and self.k:
            raise TokenJourneyError(
                f"sae.k={self.k} does not apply to {arch} (its L0 follows "
                "sae.sparsity_coefficient or sae.target_l0); leave sae.k=0 or use sae=topk / sae=batchtopk"
            )
        if arch in USES_K and self.sparsity_coefficient:
            raise TokenJourneyError(f"sae.sparsity_coefficient={self.sparsity_coefficient} does not apply to {arch} (k sets its L0); leave it 0 and set sae.k")
        if not 0 <= self.topk_warmup_fraction < 1:
            raise TokenJourneyError(f"sae.topk_warmup_fraction={self.topk_warmup_fraction} must be in [0, 1)")
        if not self.target_l0 and self.topk_warmup_fraction:
            raise TokenJourneyError(
                f"sae.topk_warmup_fraction={self.topk_warmup_fraction} applies only with "
                "sae.target_l0 set (it is the warm start's k); use sae=jumprelu-l0 or leave it 0"
            )
        if self.warmup_architecture not in WARMUP_ARCHITECTURES:
            raise TokenJourneyError(f"sae.warmup_architecture={self.warmup_architecture!r} is not one of {', '.join(WARMUP_ARCHITECTURES)}")
        if not self.target_l0 and self.target_l0_gain:
            raise TokenJourneyError(f"sae.target_l0_gain={self.target_l0_gain} applies only with sae.target_l0 set; use sae=jumprelu-l0 or leave it 0")
        if arch not in USES_PREFIXES and self.prefixes:
            raise TokenJourneyError(
                f"sae.prefixes={list(self.prefixes)} does not apply to {arch} (only matryoshka "
                "trains nested prefixes); leave sae.prefixes=[] or use sae=matryoshka"
            )
        if arch in USES_PREFIXES:
            prefix_sizes(self.prefixes, self.width)

    @property
    def steps(self) -> int:
        return -(-self.train_tokens // self.batch_size)

    @property
    def topk_warmup_steps(self) -> int:
        """Steps of the TopK warm start (see `topk_warmup_fraction`)."""
        return int(self.topk_warmup_fraction * self.steps)
