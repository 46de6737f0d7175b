"""Evaluation: the callbacks that read each evaluation epoch (pictures, class reports,
temperature scaling, the run page), and the plain code behind them: class reports,
calibration, Grad-CAM, pictures and ``report.html``."""
