// Building the page's elements without ever parsing data as markup.
//
// Why: the dashboard shows decoded prompts, which are user data. Strings given
// to el() and svg() always become text nodes or attribute values, never HTML,
// so nothing a prompt contains can turn into an element or a script.

const SVG_NS = "http://www.w3.org/2000/svg";

function apply(node, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else node.setAttribute(name, String(value));
  }
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** An HTML element: el("div", {class: "x", "data-v": 1}, "text", child). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  apply(node, attrs);
  append(node, children);
  return node;
}

/** An SVG element, same calling convention as el(). */
export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  apply(node, attrs);
  append(node, children);
  return node;
}

/** Replace what ``container`` shows. */
export function show(container, ...children) {
  container.replaceChildren();
  append(container, children);
}

/** The empty state every panel shows before the first request. */
export function noRequests(what) {
  const target = `${location.origin}/v1`;
  return el(
    "div",
    { class: "empty", "data-empty": "true" },
    el("strong", { text: `No ${what} yet: ` }),
    "point your client at ",
    el("code", { text: target }),
    ` (OpenAI SDK: base_url="${target}").`,
  );
}
