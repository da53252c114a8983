// A small Markdown renderer for untrusted model output.
// Safety comes from the order of operations: every piece of text is HTML-escaped before any markup is
// added, and the only markup added is a fixed set of tags without attributes, except links, whose href must
// be http(s) or mailto (javascript:, data: and the like stay plain text). Nothing from the input can become
// a tag, an attribute or an event handler.
"use strict";

(function () {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ESCAPES[c]);
  const SAFE_URL = /^(https?:\/\/|mailto:)[^\s]*$/i;

  function inline(escaped) {
    // `escaped` is already HTML-escaped; code spans are cut out first so nothing inside them is formatted.
    const codes = [];
    let s = escaped.replace(/`([^`\n]+)`/g, (_, code) => {
      codes.push(code);
      return `\u0000${codes.length - 1}\u0000`;
    });
    s = s.replace(/\[([^\]\n]+)\]\(([^)\s]+)\)/g, (whole, text, url) => {
      const raw = url.replace(/&amp;/g, "&");
      if (!SAFE_URL.test(raw)) return whole;
      return `<a href="${url}" rel="noopener noreferrer nofollow" target="_blank">${text}</a>`;
    });
    s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
    s = s.replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>");
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${codes[Number(i)]}</code>`);
  }

  function blocks(text) {
    const out = [];
    let list = null;
    let para = [];
    const flushPara = () => {
      if (para.length) out.push(`<p>${para.map(inline).join("<br>")}</p>`);
      para = [];
    };
    const flushList = () => {
      if (list) out.push(`<${list.tag}>${list.items.map((i) => `<li>${inline(i)}</li>`).join("")}</${list.tag}>`);
      list = null;
    };
    for (const line of escapeHtml(text).split("\n")) {
      const heading = /^(#{1,4})\s+(.*)$/.exec(line);
      const bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
      const numbered = /^\s*\d+[.)]\s+(.*)$/.exec(line);
      if (heading) {
        flushPara(); flushList();
        const level = heading[1].length + 2; // h3..h6 inside a message
        out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
      } else if (bullet || numbered) {
        flushPara();
        const tag = bullet ? "ul" : "ol";
        if (!list || list.tag !== tag) { flushList(); list = { tag, items: [] }; }
        list.items.push((bullet || numbered)[1]);
      } else if (line.trim() === "") {
        flushPara(); flushList();
      } else {
        flushList();
        para.push(line);
      }
    }
    flushPara(); flushList();
    return out.join("");
  }

  function render(source) {
    // Fenced code blocks alternate with prose: ```lang\ncode``` ; an unclosed fence (mid-stream) is code.
    const parts = source.split("```");
    return parts
      .map((part, i) => {
        if (i % 2 === 0) return blocks(part);
        const newline = part.indexOf("\n");
        const lang = newline >= 0 ? part.slice(0, newline).trim() : "";
        const code = newline >= 0 ? part.slice(newline + 1) : part;
        const label = /^[\w+#.-]{1,20}$/.test(lang) ? `<span class="lang">${escapeHtml(lang)}</span>` : "";
        return `<pre>${label}<code>${escapeHtml(code.replace(/\n$/, ""))}</code></pre>`;
      })
      .join("");
  }

  window.renderMarkdown = render;
})();
