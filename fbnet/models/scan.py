"""SCAN: stacked cross attention between regions and words (Lee, Chen, Hua, Hu, He; ECCV 2018;
public code kuanghuei/SCAN), as FB-Net's paper compares against it (``../shared/papers/002``).

As published: a fully connected layer projects each region feature to ``d`` and l2-normalises
it; a Bi-GRU reads the caption and averages its two directions; text-to-image (t-i: every word
attends over the regions, softmax temperature lambda_1 = ``delta2`` = 9) or image-to-text (i-t:
every region attends over the words, lambda_1 = ``delta1`` = 4) stacked cross attention; the
relevances ``R(e, a) = cos(e, a)`` pooled by the average or by LogSumExp
(``1/lambda_2 log sum exp(lambda_2 R)``, lambda_2 = ``lse_lambda`` = 6); the VSE++
hardest-negative triplet loss (``loss.name: triplet``, margin 0.2). ``configs/scan.yaml`` sets
t-i with LSE pooling, SCAN's best single model on MS-COCO.

Where this differs from the published model: the regions are at most J = 9 detector boxes
RoIAligned from the backbone (F-Net's level-1 blocks; the whole image when none is found), not
36 bottom-up-attention regions of a Visual Genome Faster R-CNN; SCAN's clipped l2norm uses
LeakyReLU(0.1) in the public code and ``[x]_+`` in the paper (here ``[x]_+``, as FB-Net's eqs.
13-14). SCAN has no single-vector embedding; fbnet adds one (mean region, mean word; key ``B1``),
trained beside SCAN's score but weighted 0 in it, so two-stage search has a first stage.
"""

from __future__ import annotations

from .region import RegionModel


class SCAN(RegionModel):
    uses_grid = False
    global_weight = 0.0
