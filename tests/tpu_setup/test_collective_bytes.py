"""aot_compile.collective_bytes: per-chip collective traffic of an optimized HLO module, loop
bodies counted as often as their loops run (XLA's cost analysis counts them once)."""

import pytest

from tpu_setup.aot_compile import collective_bytes

# The shapes of XLA:TPU's optimized HLO (from a compiled 16B step, cut down): a lax.scan over 34
# layers whose counter goes through a copy, in it a windowed einsum loop unrolled by 2 (bound 16,
# step 2: 8 runs), and a loop of another shape (counted once).
HLO = """HloModule jit_train_step, entry_computation_layout={()->()}

%scan_cond (p.0: (s32[], bf16[64,128])) -> pred[] {
  %c.34 = s32[]{:T(128)} constant(34)
  %p.0 = (s32[]{:T(128)}, bf16[64,128]) parameter(0)
  %gte.0 = s32[]{:T(128)} get-tuple-element(%p.0), index=0
  ROOT %lt.0 = pred[]{:T(512)} compare(%gte.0, %c.34), direction=LT
}

%window_cond (p.1: (bf16[8,128], u32[])) -> pred[] {
  %c.16 = u32[]{:T(128)} constant(16)
  %p.1 = (bf16[8,128], u32[]{:T(128)}) parameter(0)
  %gte.1 = u32[]{:T(128)} get-tuple-element(%p.1), index=1
  ROOT %lt.1 = pred[]{:T(512)} compare(%gte.1, %c.16), direction=LT
}

%window_body (p.2: (bf16[8,128], u32[])) -> (bf16[8,128], u32[]) {
  %c.1 = u32[]{:T(128)} constant(1)
  %c.2 = u32[]{:T(128)} constant(2)
  %p.2 = (bf16[8,128], u32[]{:T(128)}) parameter(0)
  %gte.2 = bf16[8,128]{1,0} get-tuple-element(%p.2), index=0
  %gte.3 = u32[]{:T(128)} get-tuple-element(%p.2), index=1
  %add.odd = u32[]{:T(128)} add(%gte.3, %c.1)
  %cp.0 = bf16[8,128]{1,0:T(8,128)(2,1)} collective-permute(%gte.2), channel_id=3, source_target_pairs={{0,1},{1,0}}
  %add.next = u32[]{:T(128)} add(%gte.3, %c.2)
  ROOT %t.2 = (bf16[8,128]{1,0}, u32[]{:T(128)}) tuple(%cp.0, %add.next)
}

%scan_body (p.3: (s32[], bf16[64,128])) -> (s32[], bf16[64,128]) {
  %c.one = s32[]{:T(128)} constant(1)
  %p.3 = (s32[]{:T(128)}, bf16[64,128]) parameter(0)
  %gte.4 = s32[]{:T(128)} get-tuple-element(%p.3), index=0
  %copy.4 = s32[]{:T(128)} copy(%gte.4)
  %gte.5 = bf16[64,128]{1,0} get-tuple-element(%p.3), index=1
  %ag.0 = bf16[64,128]{1,0:T(8,128)(2,1)} all-gather(%gte.5), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true, metadata={op_name="jit(train_step)/while/body/dot_general"}
  %w.0 = (bf16[8,128]{1,0}, u32[]{:T(128)}) while(%t.init), condition=%window_cond, body=%window_body
  %add.4 = s32[]{:T(128)} add(%copy.4, %c.one)
  ROOT %t.3 = (s32[]{:T(128)}, bf16[64,128]{1,0}) tuple(%add.4, /*index=1*/%ag.0)
}

%odd_cond (p.4: (f32[])) -> pred[] {
  %p.4 = (f32[]{:T(128)}) parameter(0)
  %gte.6 = f32[]{:T(128)} get-tuple-element(%p.4), index=0
  ROOT %lt.2 = pred[]{:T(512)} compare(%gte.6, %gte.6), direction=LT
}

%odd_body (p.5: (f32[])) -> (f32[]) {
  %p.5 = (f32[]{:T(128)}) parameter(0)
  %ar.1 = f32[256]{0} all-reduce(%x), channel_id=5, replica_groups=mesh['axis_0'=2,'axis_1'=4] device_ids=([2,4]T(1,0)) {'axis_1'}, to_apply=%add
  ROOT %t.5 = (f32[]{:T(128)}) tuple(%gte.6)
}

ENTRY %main.1 (a.1: f32[1024]) -> f32[1024] {
  %a.1 = f32[1024]{0} parameter(0)
  %ar.0 = f32[1024]{0:T(1024)} all-reduce(%a.1), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %ags.0 = (bf16[16,128]{1,0}, bf16[128,128]{1,0}) all-gather-start(%b.1), channel_id=4, replica_groups=[1,8]<=[8], dimensions={0}
  %agd.0 = bf16[128,128]{1,0} all-gather-done(%ags.0)
  %w.1 = (s32[]{:T(128)}, bf16[64,128]{1,0}) while(%t.0), condition=%scan_cond, body=%scan_body
  %w.2 = (f32[]{:T(128)}) while(%t.1), condition=%odd_cond, body=%odd_body
  ROOT %r.0 = f32[1024]{0} copy(%ar.0)
}
"""  # noqa: E501 (XLA's own long lines)


def test_loops_are_weighted_by_their_trip_counts():
    got = collective_bytes(HLO)
    ag_scan, ag_entry = 64 * 128 * 2, 128 * 128 * 2  # bf16; the async start's largest array is its result
    permute, ar_entry, ar_odd = 8 * 128 * 2, 1024 * 4, 256 * 4
    assert got["result_bytes"] == {
        "all-gather": 34 * ag_scan + ag_entry,
        "all-reduce": ar_entry + ar_odd,
        "collective-permute": 34 * 8 * permute,
    }
    # Ring bytes per chip: all-gather S (n-1)/n, all-reduce 2 S (n-1)/n, a permute S.
    assert got["moved_bytes"] == {
        "all-gather": round(34 * ag_scan * 3 / 4 + ag_entry * 7 / 8),
        "all-reduce": round(2 * ar_entry * 7 / 8 + 2 * ar_odd * 3 / 4),
        "collective-permute": 34 * 8 * permute,
    }
    assert got["moved_total_bytes"] == pytest.approx(sum(got["moved_bytes"].values()), abs=2)
    assert got["loops_unknown"] == 1  # the loop whose condition compares no constant
    top = got["largest"][0]
    assert (top["kind"], top["runs"], top["group"]) == ("collective-permute", 272, None)
    assert got["largest"][1]["op_name"] == "jit(train_step)/while/body/dot_general"


def test_text_without_an_entry_computation_gives_nothing():
    assert collective_bytes("not an HLO module") == {}
