// A small, safe Markdown renderer: everything is HTML-escaped first, then a few constructs are
// turned into tags (fenced and inline code, headings, lists, bold, italic, http(s) links).
// Model output can never inject markup or script.
(function () {
  "use strict";
  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }
  function inline(text) {
    // `text` is already escaped; code spans are cut out first so nothing inside them is formatted.
    const spans = [];
    text = text.replace(/`([^`\n]+)`/g, function (_, code) {
      spans.push("<code>" + code + "</code>");
      return "\u0000" + (spans.length - 1) + "\u0000";
    });
    text = text.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>")
      .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
        '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
    return text.replace(/\u0000(\d+)\u0000/g, function (_, i) { return spans[Number(i)]; });
  }
  function render(source) {
    const out = [];
    const lines = source.split("\n");
    let i = 0, paragraph = [], list = null;
    function flushParagraph() {
      if (paragraph.length) out.push("<p>" + paragraph.map(inline).join("<br>") + "</p>");
      paragraph = [];
    }
    function flushList() {
      if (list) out.push("<" + list.tag + ">" + list.items.map(function (t) { return "<li>" + inline(t) + "</li>"; }).join("") + "</" + list.tag + ">");
      list = null;
    }
    while (i < lines.length) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
      if (fence) {
        flushParagraph(); flushList();
        const code = [];
        i++;
        while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) { code.push(lines[i]); i++; }
        i++; // the closing fence (or the end of a reply still streaming)
        const lang = fence[1] ? ' class="language-' + escapeHtml(fence[1]) + '"' : "";
        out.push("<pre><code" + lang + ">" + escapeHtml(code.join("\n")) + "</code></pre>");
        continue;
      }
      const escaped = escapeHtml(line);
      const heading = escaped.match(/^(#{1,6})\s+(.*)$/);
      const bullet = escaped.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = escaped.match(/^\s*\d+[.)]\s+(.*)$/);
      if (heading) {
        flushParagraph(); flushList();
        const level = heading[1].length;
        out.push("<h" + level + ">" + inline(heading[2]) + "</h" + level + ">");
      } else if (bullet || numbered) {
        flushParagraph();
        const tag = bullet ? "ul" : "ol";
        if (!list || list.tag !== tag) { flushList(); list = { tag: tag, items: [] }; }
        list.items.push((bullet || numbered)[1]);
      } else if (!escaped.trim()) {
        flushParagraph(); flushList();
      } else {
        flushList();
        paragraph.push(escaped);
      }
      i++;
    }
    flushParagraph(); flushList();
    return out.join("\n");
  }
  window.renderMarkdown = render;
  window.escapeHtml = escapeHtml;
})();
