"""knn-defense: kNN defense against adversarial images (Dubey et al., CVPR 2019) as a Ray pipeline."""

__version__ = "0.1.0"
