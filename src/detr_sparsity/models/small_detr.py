"""The small DETR of the synthetic study: DETR's architecture family at reduced widths."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d, replace_batch_norm


def small_detr_config(architecture: dict[str, Any], categories: list[dict]) -> DetrConfig:
    """A DetrConfig with transformers' own ResNet backbone, ReLU FFNs, and labels == COCO category ids."""
    stages = len(architecture["backbone_hidden_sizes"])
    backbone = ResNetConfig(
        embedding_size=architecture["backbone_hidden_sizes"][0],
        hidden_sizes=architecture["backbone_hidden_sizes"],
        depths=architecture["backbone_depths"],
        layer_type="basic",
        # Only the last stage feeds the transformer, as in DETR.
        out_features=[f"stage{stages}"],
    )
    # As in DETR-R50, the label index is the COCO category id; unused ids are "N/A".
    num_labels = max(c["id"] for c in categories) + 1
    id2label = {i: "N/A" for i in range(num_labels)}
    id2label.update({c["id"]: c["name"] for c in categories})
    return DetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone,
        use_pretrained_backbone=False,
        d_model=architecture["d_model"],
        encoder_layers=architecture["encoder_layers"],
        decoder_layers=architecture["decoder_layers"],
        encoder_ffn_dim=architecture["ffn_dim"],
        decoder_ffn_dim=architecture["ffn_dim"],
        encoder_attention_heads=architecture["attention_heads"],
        decoder_attention_heads=architecture["attention_heads"],
        num_queries=architecture["num_queries"],
        activation_function="relu",
        dropout=architecture["dropout"],
        auxiliary_loss=True,
        num_labels=num_labels,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items() if v != "N/A"},
    )


def build_small_detr(config: DetrConfig) -> DetrForObjectDetection:
    """A randomly initialised small DETR, initialised as the original DETR, whose whole backbone trains."""
    model = DetrForObjectDetection(config)
    # transformers initialises every Linear, Conv and Embedding with N(0, 0.02). Measured here: with queries that
    # close together every query predicted one box after 1000 steps, and with the image features scaled down
    # by the input projection the class scores stayed uniform. So initialise as the original DETR does:
    # Xavier-uniform transformer weights, N(0, 1) queries, PyTorch's default init for the input projection
    # and the prediction heads.
    for layer in [*model.model.encoder.layers, *model.model.decoder.layers]:
        for p in layer.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
    nn.init.normal_(model.model.query_position_embeddings.weight)
    for module in [model.model.input_projection, model.class_labels_classifier, *model.bbox_predictor.layers]:
        module.reset_parameters()
    # DETR freezes the stem and first stage because it starts from ImageNet weights; we start from scratch.
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_batch_norm(model: DetrForObjectDetection) -> None:
    """Swap the backbone's frozen batch norms for trainable ones, for pretraining from scratch.

    DETR freezes batch norm because its backbone arrives ImageNet-trained; ours starts random, and a
    from-scratch convnet trains far faster with real batch statistics.
    """
    def swap(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, DetrFrozenBatchNorm2d):
                bn = nn.BatchNorm2d(child.weight.numel())
                with torch.no_grad():
                    bn.weight.copy_(child.weight)
                    bn.bias.copy_(child.bias)
                    bn.running_mean.copy_(child.running_mean)
                    bn.running_var.copy_(child.running_var)
                module._modules[name] = bn
            else:
                swap(child)

    swap(model.model.backbone)


def freeze_batch_norm(model: DetrForObjectDetection) -> None:
    """Back to DETR's frozen batch norm, carrying the learned statistics: a standard DETR again."""
    with torch.no_grad():
        replace_batch_norm(model.model.backbone)
