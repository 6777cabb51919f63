// Greedy decoding with llama.cpp from token ids: ids in, ids out (scripts/bench_llamacpp.py).
//
//   llama-greedy MODEL.gguf N_NEW THREADS ID,ID,...
//
// Loads the model, feeds the prompt ids as they are (no BOS, no tokenizer), then takes the
// argmax of the logits N_NEW times, feeding each new id back. Prints one JSON line on stdout:
// {"tokens": [...], "load_s": ..., "prefill_s": ..., "decode_s": ...}. Compiled by the
// benchmark against the llama.h and libllama it built; not part of the project's code.

#include "llama.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

static double now_s() {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
}

static void quiet_log(enum ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static llama_token argmax(const float * logits, int n_vocab) {
    int best = 0;
    for (int i = 1; i < n_vocab; ++i) {
        if (logits[i] > logits[best]) {
            best = i;
        }
    }
    return best;
}

int main(int argc, char ** argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL.gguf N_NEW THREADS ID,ID,...\n", argv[0]);
        return 2;
    }
    const int n_new = atoi(argv[2]);
    const int n_threads = atoi(argv[3]);
    std::vector<llama_token> prompt;
    for (std::string s = argv[4]; !s.empty();) {
        size_t comma = s.find(',');
        prompt.push_back((llama_token) atoi(s.substr(0, comma).c_str()));
        s = comma == std::string::npos ? "" : s.substr(comma + 1);
    }
    if (prompt.empty() || n_new < 1 || n_threads < 1) {
        fprintf(stderr, "error: need a non-empty prompt, N_NEW >= 1 and THREADS >= 1\n");
        return 2;
    }

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    const double t0 = now_s();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (model == nullptr) {
        fprintf(stderr, "error: cannot load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) (prompt.size() + n_new + 16);
    cp.n_batch = (uint32_t) prompt.size();
    cp.n_ubatch = (uint32_t) prompt.size();
    cp.n_seq_max = 1;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == nullptr) {
        fprintf(stderr, "error: cannot create a llama context\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    const double t1 = now_s();

    if (llama_decode(ctx, llama_batch_get_one(prompt.data(), (int32_t) prompt.size())) != 0) {
        fprintf(stderr, "error: llama_decode failed on the prompt\n");
        return 1;
    }
    llama_token tok = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
    const double t2 = now_s();

    std::vector<llama_token> out{tok};
    while ((int) out.size() < n_new) {
        if (llama_decode(ctx, llama_batch_get_one(&tok, 1)) != 0) {
            fprintf(stderr, "error: llama_decode failed at new token %zu\n", out.size());
            return 1;
        }
        tok = argmax(llama_get_logits_ith(ctx, -1), n_vocab);
        out.push_back(tok);
    }
    const double t3 = now_s();

    printf("{\"tokens\": [");
    for (size_t i = 0; i < out.size(); ++i) {
        printf(i ? ", %d" : "%d", out[i]);
    }
    printf("], \"n_vocab\": %d, \"load_s\": %.6f, \"prefill_s\": %.6f, \"decode_s\": %.6f}\n",
           n_vocab, t1 - t0, t2 - t1, t3 - t2);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
