// Draws each <canvas data-chart="{...}"> with Chart.js. The figures come from the server (already
// computed); the table next to each chart lists the same numbers. Nothing here does arithmetic.
"use strict";

function drawCharts() {
  if (typeof Chart === "undefined") return;
  for (const canvas of document.querySelectorAll("canvas[data-chart]")) {
    if (canvas.dataset.drawn) continue;
    let spec;
    try {
      spec = JSON.parse(canvas.dataset.chart);
    } catch (_) {
      continue;
    }
    const datasets = spec.datasets.map((d) => ({
      label: d.label,
      data: d.data,
      backgroundColor: d.colors || d.color,
      borderColor: d.colors || d.color,
    }));
    new Chart(canvas, {
      type: spec.type,
      data: { labels: spec.labels, datasets },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        animation: false,
        plugins: { legend: { display: datasets.length > 1 || spec.type === "doughnut" } },
      },
    });
    canvas.dataset.drawn = "1";
  }
}

document.addEventListener("DOMContentLoaded", drawCharts);
document.addEventListener("htmx:afterSettle", drawCharts);
