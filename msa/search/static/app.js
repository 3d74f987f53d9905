// The search page: sends the form to /api/search and draws the results grid. Every string from the server
// (paths above all) is inserted as text, never as HTML.
"use strict";

const form = document.getElementById("search-form");
const queryInput = document.getElementById("query");
const topKInput = document.getElementById("top-k");
const rerankInput = document.getElementById("rerank");
const button = document.getElementById("search-button");
const statusLine = document.getElementById("status");
const grid = document.getElementById("results");

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function formatScore(value) {
  return value === null || value === undefined ? "n/a" : value.toFixed(4);
}

function showStatus(text, isError) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", Boolean(isError));
}

// MSCMAT's per-scale scores are sigmoids, in [0, 1]: a bar is the score itself. Should a model give scores outside
// that range, bars are scaled by the largest absolute score on the page instead, so that they still compare.
function barScale(hits) {
  let largest = 0;
  for (const hit of hits) {
    for (const value of hit.scale_scores) {
      if (value !== null) largest = Math.max(largest, Math.abs(value));
    }
  }
  return largest <= 1 ? 1 : largest;
}

function scaleBars(hit, barFull) {
  const panel = element("div", "scales");
  if (hit.scale_scores.length === 0) {
    panel.append(element("div", "", "global cosine only (re-rank 0)"));
  }
  hit.scale_scores.forEach((value, scale) => {
    const row = element("div", "scale");
    row.append(element("span", "label", `scale ${scale}`));
    const track = element("div", "track");
    const fill = element("div", value !== null && value < 0 ? "fill negative" : "fill");
    const fraction = value === null || barFull === 0 ? 0 : Math.abs(value) / barFull;
    fill.style.width = `${(100 * fraction).toFixed(1)}%`;
    track.append(fill);
    row.append(track, element("span", "value", formatScore(value)));
    panel.append(row);
  });
  panel.append(element("div", "global", `global cosine ${formatScore(hit.global_score)}`));
  return panel;
}

function resultCard(hit, barFull) {
  const card = element("li", "hit");
  card.tabIndex = 0;
  card.dataset.row = String(hit.row);
  const image = element("img");
  image.src = hit.thumbnail;
  image.alt = hit.path;
  image.decoding = "async";
  const meta = element("div", "meta");
  const line = element("div");
  line.append(element("span", "rank", `#${hit.rank}`), element("span", "score", formatScore(hit.score)));
  meta.append(line, element("div", "path", hit.path));
  const thumb = element("div", "thumb");
  thumb.append(image, scaleBars(hit, barFull));
  card.append(thumb, meta);
  const toggle = () => card.classList.toggle("open");
  card.addEventListener("click", toggle);
  card.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      toggle();
    }
  });
  return card;
}

function showResults(body) {
  const barFull = barScale(body.hits);
  grid.replaceChildren(...body.hits.map((hit) => resultCard(hit, barFull)));
  const mode = body.rerank > 0 ? `re-ranked top ${body.rerank} by MSCMAT` : "global cosine";
  const milliseconds = Math.round(1000 * body.seconds);
  showStatus(`${body.hits.length} of ${body.num_images} images, ${mode}, ${milliseconds} ms`, false);
  grid.dataset.state = "ready";
}

async function search(query, topK, rerank) {
  const params = new URLSearchParams({ q: query, k: topK, rerank: rerank });
  button.disabled = true;
  grid.dataset.state = "loading";
  showStatus("searching...", false);
  try {
    const response = await fetch(`/api/search?${params}`, { headers: { Accept: "application/json" } });
    const body = await response.json();
    if (!response.ok) {
      grid.replaceChildren();
      grid.dataset.state = "error";
      showStatus(body.error || `error ${response.status}`, true);
      return;
    }
    showResults(body);
    history.replaceState(null, "", `?${params}`);
  } catch (error) {
    grid.dataset.state = "error";
    showStatus(`the server did not answer: ${error.message}`, true);
  } finally {
    button.disabled = false;
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  search(queryInput.value.trim(), topKInput.value, rerankInput.value);
});

// The index's size, and the server's limits on k and re-rank as the bounds of their inputs.
async function showIndexInfo() {
  try {
    const response = await fetch("/healthz");
    const body = await response.json();
    document.getElementById("index-info").textContent =
      `${body.num_images} images indexed, ${body.num_scales} scales`;
    topKInput.max = String(body.max_top_k);
    rerankInput.max = String(body.max_rerank);
  } catch (error) {
    document.getElementById("index-info").textContent = "";
  }
}

// A page opened at ?q=...&k=...&rerank=... (a shared or reloaded search) runs that search.
function searchFromAddress() {
  const params = new URLSearchParams(window.location.search);
  if (params.has("k")) topKInput.value = params.get("k");
  if (params.has("rerank")) rerankInput.value = params.get("rerank");
  if (params.get("q")) {
    queryInput.value = params.get("q");
    search(queryInput.value.trim(), topKInput.value, rerankInput.value);
  }
}

showIndexInfo();
searchFromAddress();
