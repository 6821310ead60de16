"""A seqio feature converter for decoder-only training with per-token loss weights.

Like `seqio.LMFeatureConverter` (t5x conventions: inputs are the targets shifted right with
`bos_id` 0 at each segment start; packing adds segment ids and positions that restart per
segment), but the loss weights come from the task instead of "every non-padding token", so
SFT masks survive packing.

seqio's packing measures each feature's length by its non-zero entries and carries features as
int32, so a weight mask with leading zeros would be shifted. Tasks therefore provide
`loss_weights_plus_one` (int32: 1 = not trained, 2 = trained); this converter subtracts one
after packing, and padding (0) becomes weight 0. For the same reason a `targets` id 0 cannot be
packed (our SentencePiece vocabularies never produce it: 0 is pad; the released BPE gives it to
"!"): when packing, the converter raises on it, and on targets and weights of different lengths,
instead of producing misaligned rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

WEIGHTS_FEATURE = "loss_weights_plus_one"


def add_weights_feature(ex: Mapping[str, tf.Tensor], weights: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    """Adds `loss_weights_plus_one` to an example (all tokens trained when `weights` is None)."""
    out = dict(ex)
    w = tf.ones_like(ex["targets"]) if weights is None else tf.cast(weights, tf.int32)
    out[WEIGHTS_FEATURE] = w + 1
    return out


def _check_packable(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Fails (InvalidArgumentError with this message) on an example seqio packing would misalign."""
    targets, weights = ex["targets"], ex[WEIGHTS_FEATURE]
    checks = [
        tf.debugging.assert_equal(
            tf.size(targets),
            tf.size(weights),
            message=f"targets and {WEIGHTS_FEATURE} differ in length: they would be misaligned in packed rows",
        ),
        tf.debugging.assert_none_equal(
            targets,
            tf.zeros_like(targets),
            message="a targets id is 0, which seqio packing reads as padding (the example would be cut short "
            "and misaligned with its loss weights); pack only vocabularies whose id 0 is pad (our "
            "SentencePiece models), not the released BPE (id 0 is '!'), or use pack=False",
        ),
    ]
    with tf.control_dependencies(checks):
        return {**ex, "targets": tf.identity(targets)}


class WeightedLMFeatureConverter(seqio.LMFeatureConverter):
    TASK_FEATURES = {
        "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        WEIGHTS_FEATURE: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }
    MODEL_FEATURES = {
        "decoder_target_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "decoder_input_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "decoder_loss_weights": seqio.FeatureConverter.FeatureSpec(dtype=tf.float32),
    }

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        if self.pack:
            ds = ds.map(_check_packable, num_parallel_calls=tf.data.AUTOTUNE)
        return super()._convert_features(ds, task_feature_lengths)

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
        out = {
            "decoder_target_tokens": features["targets"],
            "decoder_input_tokens": seqio.utils.make_autoregressive_inputs(
                features["targets"], sequence_id=features.get("targets_segment_ids"), bos_id=self.bos_id
            ),
            "decoder_loss_weights": tf.cast(tf.maximum(features[WEIGHTS_FEATURE] - 1, 0), tf.float32),
        }
        if self.pack:
            out["decoder_segment_ids"] = features["targets_segment_ids"]
            out["decoder_positions"] = features["targets_positions"]
        return out

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        return dict(super().get_model_feature_lengths({"targets": task_feature_lengths["targets"]}))


class PairFeatureConverter(seqio.FeatureConverter):
    """Preference pairs -> padded (unpacked) model features per side.

    For side in (chosen, rejected): `{side}_decoder_input_tokens`, `_target_tokens`,
    `_loss_weights` (1 on the final reply only), `_segment_ids` (1 on real tokens, 0 on
    padding) and `_positions`, all of the task's length.
    """

    TASK_FEATURES = {
        k: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
        for side in ("chosen", "rejected")
        for k in (side, f"{side}_{WEIGHTS_FEATURE}")
    }
    MODEL_FEATURES = {
        f"{side}_{k}": seqio.FeatureConverter.FeatureSpec(dtype=tf.float32 if k == "decoder_loss_weights" else tf.int32)
        for side in ("chosen", "rejected")
        for k in (
            "decoder_input_tokens",
            "decoder_target_tokens",
            "decoder_loss_weights",
            "decoder_segment_ids",
            "decoder_positions",
        )
    }
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, **kwargs):
        super().__init__(pack=False, **kwargs)

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        ds = self._pack_or_pad(ds, task_feature_lengths)

        def convert(ex):
            out = {}
            for side in ("chosen", "rejected"):
                targets = ex[side]
                real = tf.cast(tf.not_equal(ex[f"{side}_{WEIGHTS_FEATURE}"], 0), tf.int32)
                out[f"{side}_decoder_target_tokens"] = targets
                out[f"{side}_decoder_input_tokens"] = seqio.utils.make_autoregressive_inputs(
                    targets, bos_id=self.bos_id
                )
                out[f"{side}_decoder_loss_weights"] = tf.cast(
                    tf.maximum(ex[f"{side}_{WEIGHTS_FEATURE}"] - 1, 0), tf.float32
                )
                out[f"{side}_decoder_segment_ids"] = real
                out[f"{side}_decoder_positions"] = tf.range(tf.shape(targets)[0], dtype=tf.int32) * real
            return out

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        return {k: task_feature_lengths[k.split("_")[0]] for k in self.MODEL_FEATURES}
