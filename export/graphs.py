"""The nn.Module wrappers that define each exported ONNX graph (ARCHITECTURE.md, "ONNX interface").

One clip per call, no batch axis: the wrappers add and remove the model's batch axis (B = 1) around
the model's own modules, so the graphs compute exactly what `EfficientVIS.forward` computes.

- `BackboneGraph`:  frames uint8 (T, 3, H, W) -> p2, p3, p4, p5, each (T, C, ceil(H/s), ceil(W/s)).
  `EfficientVIS.features` (normalisation inside the backbone).
- `FirstStageGraph`: p2..p5, init_queries (N, C), image_size (2,) = (H, W) float32, carried (N,)
  float32 (1: the slot starts from its carried box), carried_boxes (N, 4) float32 xyxy input
  pixels -> queries (N, T, C), proposals (N, T, 4), class_logits (N, T, K), attended (N, T, C)
  (the self-attended queries, the input of the stage's dynamic mask head), next_queries (N, C).
  The clip-start queries and proposals are built by `EfficientVIS.initial_queries` /
  `EfficientVIS.clip_start_proposals` (T taken from the features; with model.init_boxes=dense
  the dense proposal head and its peak selection are part of this graph). `carried` is all zero for a model
  trained without model.carry_proposals (every slot starts from the learned boxes, the paper's
  rule); the runtime's clip loop sets it for a model trained with it.
- `StageGraph(k)`, k >= 1: p2..p5, queries_in (N, T, C), proposals_in (N, T, 4) -> the same outputs.
- `MaskHeadGraph(k)`: p2..p5, attended (N, T, C), proposals (N, T, 4) of stage k -> mask_probs
  (N, T, 2S, 2S) (S = mask_pooler_size; the sigmoid of the mask logits: bounded values that
  float32/FP16 carry with uniform precision).

The mask heads are graphs of their own because only the last stage run needs masks: a stage
graph with its mask head would compute M-1 unused mask heads per clip, which ONNX Runtime and
TensorRT cannot skip (the mask head is the most expensive part of a stage).

`next_queries` is the stage's queries averaged over T (what `EfficientVIS.forward` returns as
`next_queries` after its last iteration), so any stage can end the clip (anytime inference).
"""

from torch import nn

from efficientvis.training.model import EfficientVIS

FEATURES = ("p2", "p3", "p4", "p5")
STRIDES = (4, 8, 16, 32)
STAGE_OUTPUTS = ("queries", "proposals", "class_logits", "attended", "next_queries")
MASK_INPUTS = FEATURES + ("attended", "proposals")
MASK_OUTPUTS = ("mask_probs",)
FUSED_OUTPUTS = ("class_logits", "proposals", "mask_probs", "next_queries")
BACKBONE_INPUTS = ("frames",)
CLIP_START_INPUTS = ("init_queries", "image_size", "carried", "carried_boxes")  # stage_0's, the fused graph's
FIRST_STAGE_INPUTS = FEATURES + CLIP_START_INPUTS
STAGE_INPUTS = FEATURES + ("queries_in", "proposals_in")
FUSED_INPUTS = ("frames",) + CLIP_START_INPUTS


def _stage_outputs(out):
    """One iteration's outputs (B=1) -> the graph's outputs, batch axis removed."""
    queries = out["queries"][0]  # (N, T, C)
    return (queries, out["boxes"][0], out["class_logits"][0], out["attended"][0],
            queries.mean(1))  # next_queries (N, C): as EfficientVIS.forward's queries.mean(2)


class BackboneGraph(nn.Module):
    def __init__(self, model: EfficientVIS):
        super().__init__()
        self.model = model

    def forward(self, frames):  # (T, 3, H, W) uint8 RGB
        # uint8 -> float32 first (exact; the backbone normalises float input the same way): TensorRT
        # takes a uint8 network input only straight into a Cast.
        p2, p3, p4, p5 = self.model.features(frames.float()[None])  # (B*T, C, h, w) with B = 1
        return p2, p3, p4, p5


class FirstStageGraph(nn.Module):
    def __init__(self, model: EfficientVIS):
        super().__init__()
        self.model = model
        self.iteration = model.iterations[0]

    def forward(self, p2, p3, p4, p5, init_queries, image_size, carried, carried_boxes):
        T = p2.shape[0]
        queries = self.model.initial_queries(1, T, init_queries[None])  # (1, N, T, C)
        boxes, _ = self.model.clip_start_proposals([p2, p3, p4, p5], image_size[None], T,
                                                   (carried[None] > 0.5, carried_boxes[None]))
        return _stage_outputs(self.iteration([p2, p3, p4, p5], queries, boxes, with_masks=False))


class StageGraph(nn.Module):
    def __init__(self, model: EfficientVIS, index: int):
        super().__init__()
        if not 1 <= index < len(model.iterations):
            raise ValueError(f"stage index {index} out of 1..{len(model.iterations) - 1}")
        self.iteration = model.iterations[index]

    def forward(self, p2, p3, p4, p5, queries_in, proposals_in):
        return _stage_outputs(self.iteration([p2, p3, p4, p5], queries_in[None], proposals_in[None],
                                             with_masks=False))


class MaskHeadGraph(nn.Module):
    def __init__(self, model: EfficientVIS, index: int):
        super().__init__()
        if not 0 <= index < len(model.iterations):
            raise ValueError(f"mask head index {index} out of 0..{len(model.iterations) - 1}")
        self.iteration = model.iterations[index]

    def forward(self, p2, p3, p4, p5, attended, proposals):
        return self.iteration.masks([p2, p3, p4, p5], attended[None], proposals[None])[0].sigmoid()


def stage_names(num_stages: int):
    return [f"stage_{k}" for k in range(num_stages)]


def mask_head_names(num_stages: int):
    return [f"mask_{k}" for k in range(num_stages)]


def split_names(num_stages: int):
    """Every graph of the split interface, in the order a full clip runs them (but mask_0 .. mask_{M-2}
    run only when fewer stages end the clip)."""
    return ["backbone"] + stage_names(num_stages) + mask_head_names(num_stages)


def build_graph_module(model: EfficientVIS, name: str) -> nn.Module:
    """"backbone" | "stage_k" | "mask_k" -> the wrapper module, in eval mode."""
    if name == "backbone":
        module = BackboneGraph(model)
    elif name == "stage_0":
        module = FirstStageGraph(model)
    elif name.startswith("stage_") and name[6:].isdigit():
        module = StageGraph(model, int(name[6:]))
    elif name.startswith("mask_") and name[5:].isdigit():
        module = MaskHeadGraph(model, int(name[5:]))
    else:
        raise ValueError(f"unknown graph {name!r}")
    return module.eval()


def graph_io_names(name: str):
    """(input names, output names) of a graph of the interface."""
    if name == "backbone":
        return BACKBONE_INPUTS, FEATURES
    if name == "stage_0":
        return FIRST_STAGE_INPUTS, STAGE_OUTPUTS
    if name.startswith("stage_"):
        return STAGE_INPUTS, STAGE_OUTPUTS
    if name.startswith("mask_"):
        return MASK_INPUTS, MASK_OUTPUTS
    if name == "model":
        return FUSED_INPUTS, FUSED_OUTPUTS
    raise ValueError(f"unknown graph {name!r}")
