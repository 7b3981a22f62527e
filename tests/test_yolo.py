"""YOLOv3-tiny built from the Darknet files against OpenCV's independent Darknet reader."""

import numpy as np
import pytest
import torch

from conftest import SHARED
from fbnet.config import DetectorConfig
from fbnet.models.yolo import build_yolov3_tiny

WEIGHTS = SHARED / "weights" / "yolov3-tiny-coco"
IMAGES = SHARED / "data" / "flickr8k" / "images"
pytestmark = pytest.mark.skipif(not (WEIGHTS / "yolov3-tiny.weights").is_file() or not IMAGES.is_dir(),
                                reason="needs ../shared (YOLOv3-tiny weights and Flickr8k images)")


@pytest.mark.parametrize("size", [416, 224])  # the cfg's width, and model.detector.input_size: 224
def test_matches_opencv_darknet_reader(size):
    cv2 = pytest.importorskip("cv2")
    cfg = DetectorConfig(name="yolov3_tiny", weights=str(WEIGHTS), input_size=0 if size == 416 else size)
    net = build_yolov3_tiny(cfg, 224).net
    assert net.size == size
    cvnet = cv2.dnn.readNetFromDarknet(str(WEIGHTS / "yolov3-tiny.cfg"), str(WEIGHTS / "yolov3-tiny.weights"))
    for path in sorted(IMAGES.glob("*.jpg"))[:3]:
        blob = cv2.dnn.blobFromImage(cv2.imread(str(path)), 1 / 255.0, (size, size), swapRB=True, crop=False)
        cvnet.setInput(blob)
        cv_outs = cvnet.forward(cvnet.getUnconnectedOutLayersNames())
        with torch.no_grad():
            heads = net(torch.from_numpy(blob))
        for out, head, ref in zip(heads, net.heads, cv_outs):
            boxes, obj, cls = (t[0].transpose(0, 2).transpose(0, 1).numpy() for t in net.decode_head(out, head))
            # OpenCV lists predictions cell by cell, anchors within a cell: (H, W, A)
            boxes, obj, cls = boxes.reshape(-1, 4) / size, obj.reshape(-1), cls.reshape(-1, head["classes"])
            centre_size = np.column_stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                                           boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
            assert np.allclose(centre_size, ref[:, :4], atol=1e-4)
            assert np.allclose(obj, ref[:, 4], atol=1e-4)
            kept = ref[:, 5:] > 0  # OpenCV zeroes class scores under its own threshold
            assert np.allclose((obj[:, None] * cls)[kept], ref[:, 5:][kept], atol=1e-4)


def test_detector_finds_people_and_dogs():
    det = build_yolov3_tiny(DetectorConfig(name="yolov3_tiny", weights=str(WEIGHTS)), 224)
    from fbnet.preprocess import load_image

    names = (WEIGHTS / "coco.names").read_text().splitlines()
    canvases = torch.from_numpy(np.stack([load_image(p, 224) for p in sorted(IMAGES.glob("*.jpg"))[:4]]))
    with torch.no_grad():
        boxes, scores = det(canvases)
    assert boxes.shape == (4, 9, 4) and scores.shape == (4, 9)
    assert (scores[:, 0] >= 0.1).all()  # every image gets at least one confident box
    assert (boxes[scores > 0] >= 0).all() and (boxes[scores > 0] <= 224).all()
    with torch.no_grad():  # the best class of the two first Flickr8k images: a girl, then dogs
        _, obj, cls = det.net.decode(det.net(torch.nn.functional.interpolate(canvases[:2], size=416, mode="bilinear")))
    best = (obj.unsqueeze(-1) * cls).flatten(1).argmax(dim=1) % len(names)
    assert [names[i] for i in best] == ["person", "dog"]
