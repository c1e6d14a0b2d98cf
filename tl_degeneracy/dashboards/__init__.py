"""Direction dashboards: what a basis direction responds to (top-activating contexts, histograms) and what it
does (logit effects, edges, modules), as browsable pages and as Neuronpedia/SAEDashboard JSON."""
from .examples import (
    EXAMPLES,
    ActivationHistogram,
    DirectionExamples,
    ExampleTopK,
    HistogramBins,
    coordinate_rms,
)

__all__ = ["EXAMPLES", "ActivationHistogram", "DirectionExamples", "ExampleTopK", "HistogramBins",
           "coordinate_rms"]
